"""Driving the chat page in Debian's headless chromium with Playwright (never a browser Playwright downloads).

Also a script for the README's screenshot (a finished two-turn exchange with a finetuned model):

    python -m tests.serving.browser_helpers MODEL.nemo docs/chat_page.png
"""
import os
import subprocess
import sys
import time
import urllib.request

from tests.optional import missing

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DEMO_IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "data", "shapes_demo", "images", "eval_00000.png")
ANSWER_TIMEOUT_MS = 120_000  # a generation on 2 shared CPU cores; the tiny model needs well under a second


def browser_or_skip():
    """Skip with the reason when chromium or playwright is missing, unless NEVA_REQUIRE_BROWSER=1 or
    NEVA_REQUIRE_OPTIONAL=1 (CI sets both): then fail."""
    reason = None
    if not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (as root: `apt-get install chromium`; `make test` does it when run as root)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is missing (`pip install -e .[test]`)"
    if reason:
        missing(reason, also=("NEVA_REQUIRE_BROWSER",))


def launch(playwright):
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)


class ChatPage:
    """The page, as a person uses it: through labels and roles (the accessible names are the contract)."""

    def __init__(self, page, url):
        self.page, self.console_errors, self.sent = page, [], []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
        page.on("request", lambda r: self.sent.append(r.post_data_json)
                if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
        page.goto(url + "/")
        page.get_by_role("button", name="Send").wait_for()
        self.log = page.get_by_role("log")
        page.wait_for_function("document.getElementById('temperature').value !== ''")  # /config applied

    def attach(self, path, picker="Image"):
        """Pick the file at `path` with the "Image" or "Video" picker; returns once it is listed to send."""
        self.page.get_by_label(picker, exact=True).set_input_files(path)
        self.attachments().filter(has_text=os.path.basename(path)).wait_for()

    def attachments(self):
        return self.page.get_by_role("list", name="Attachments").get_by_role("listitem")

    def attach_alert(self) -> str:
        """The composer's message about an attachment it refused (or a request it would not send)."""
        alert = self.page.locator("#attach-alert")
        alert.wait_for()
        return alert.text_content()

    def ask(self, text) -> None:
        self.page.get_by_label("Message", exact=True).fill(text)
        self.page.get_by_role("button", name="Send").click()

    def answers(self):
        return self.log.locator(".msg.assistant")

    def wait_answer(self, n: int) -> str:
        """The text of the n-th answer (1-based), once its usage line shows it finished."""
        answer = self.answers().nth(n - 1)
        answer.locator(".usage").filter(has_text="tokens").wait_for(timeout=ANSWER_TIMEOUT_MS)
        return answer.locator(".text").text_content()

    def wait_error(self) -> str:
        alert = self.log.get_by_role("alert").last
        alert.wait_for(timeout=ANSWER_TIMEOUT_MS)
        return alert.text_content()


def _screenshot(nemo_path: str, out_path: str) -> None:
    from playwright.sync_api import sync_playwright

    from nemo_neva.parallel.init import free_port

    port = free_port()
    root = os.path.dirname(DEMO_IMAGE).rsplit(os.sep + "data" + os.sep, 1)[0]
    proc = subprocess.Popen([sys.executable, os.path.join(root, "examples", "neva_serve.py"),
                             f"neva_model_file={nemo_path}", f"server.port={port}", "served_model_name=neva_finetune"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1100, "height": 740})
            chat = ChatPage(page, url)
            chat.page.get_by_label("Temperature", exact=True).fill("0")
            chat.attach(DEMO_IMAGE)
            chat.ask("Describe the image briefly.")  # the demo data's own questions
            chat.wait_answer(1)
            chat.ask("What shape is at the bottom? Answer with one word.")
            chat.wait_answer(2)
            page.screenshot(path=out_path)
            browser.close()
            assert not chat.console_errors, chat.console_errors
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    _screenshot(sys.argv[1], sys.argv[2])
