// The next user message's attachments: images and videos from the two pickers, a drop or a paste, in the order
// they came (they go to the server in that order, before the message's text). GET /config's count and byte
// limits are checked before a file is read, so a file the server would refuse for them is never sent.

// kind -> the content part it becomes and the /config limits that apply to it
export const KINDS = {
  image: {part: "image_url", count: "max_images", bytes: "max_image_bytes"},
  video: {part: "video_url", count: "max_videos", bytes: "max_video_bytes"},
};
// Video files by extension, for files the browser gives no video/ type (the server sniffs the container from
// the bytes, but refuses a data: URL whose media type is not video/...).
const VIDEO_TYPES = {mp4: "video/mp4", m4v: "video/mp4", mov: "video/quicktime", webm: "video/webm",
  mkv: "video/x-matroska", avi: "video/x-msvideo"};

export function formatBytes(n) {
  return n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
}

const plural = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;

function kindOf(file) {
  const ext = (file.name || "").split(".").pop().toLowerCase();
  if (file.type.startsWith("image/")) return "image";
  if (file.type.startsWith("video/") || ext in VIDEO_TYPES) return "video";
  return null;
}

function videoType(file) {
  return file.type.startsWith("video/") ? file.type : VIDEO_TYPES[file.name.split(".").pop().toLowerCase()];
}

/** An <img> or <video> showing an attachment (`label` is its accessible name). A video the browser cannot
 * play (the server may still read it: AVI, some codecs) becomes a file chip instead. */
export function mediaElement(item, label) {
  if (item.kind === "image") {
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = label;
    return img;
  }
  const video = document.createElement("video");
  Object.assign(video, {src: item.url, controls: true, muted: true, preload: "metadata", playsInline: true});
  video.setAttribute("aria-label", label);
  video.addEventListener("error", () => {
    const chip = document.createElement("span");
    chip.className = "file-chip";
    chip.setAttribute("role", "img");
    chip.setAttribute("aria-label", label);
    chip.textContent = "\u25B6 " + item.name;
    video.replaceWith(chip);
  }, {once: true});
  return video;
}

export class Attachments {
  /** `counted(kind)`: that kind's parts already in the conversation. */
  constructor(ui, counted) {
    this.ui = ui;  // {list, note, alert, pickers: {image, video}, drop}
    this.counted = counted;
    this.limits = null;
    this.items = [];  // {kind, name, size, url}; url is null while the file is being read
  }

  wire() {
    for (const picker of Object.values(this.ui.pickers)) {
      picker.addEventListener("change", () => {
        for (const file of picker.files) this.add(file);
        picker.value = "";  // picking the same file again fires "change" again
      });
    }
    for (const type of ["dragenter", "dragover"]) {
      document.addEventListener(type, (e) => { e.preventDefault(); this.ui.drop.classList.add("dragging"); });
    }
    document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) this.ui.drop.classList.remove("dragging"); });
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      this.ui.drop.classList.remove("dragging");
      for (const file of e.dataTransfer?.files || []) this.add(file);
    });
    document.addEventListener("paste", (e) => {
      const files = [...(e.clipboardData?.files || [])];
      if (!files.length) return;
      e.preventDefault();
      for (const file of files) this.add(file);
    });
  }

  used(kind) { return this.counted(kind) + this.items.filter((i) => i.kind === kind).length; }
  get reading() { return this.items.some((i) => i.url === null); }

  /** Attach `file`, or say why not. */
  add(file) {
    const kind = kindOf(file), name = file.name || "pasted file";
    if (!kind) return this.refuse(`${name} is neither an image nor a video.`);
    const {count, bytes} = KINDS[kind];
    const limit = this.limits[count];
    if (limit === 0) return this.refuse(`This server takes no ${kind}s (server.${count}=0).`);
    if (this.used(kind) >= limit) {
      return this.refuse(`This server takes ${plural(limit, kind)} per conversation (server.${count}); ` +
                         "start a New chat for more.");
    }
    if (file.size > this.limits[bytes]) {
      return this.refuse(`${name} is ${formatBytes(file.size)}; this server takes ${kind}s of up to ` +
                         `${formatBytes(this.limits[bytes])} (server.${bytes}).`);
    }
    const item = {kind, name, size: file.size, url: null};
    this.items.push(item);
    this.refuse("");
    const reader = new FileReader();
    reader.onload = () => {
      const data = reader.result.slice(reader.result.indexOf(",") + 1);
      item.url = `data:${kind === "video" ? videoType(file) : file.type};base64,${data}`;
      this.render();
    };
    reader.onerror = () => {
      this.items = this.items.filter((i) => i !== item);
      this.refuse(`Could not read ${name}: ${reader.error?.message || "unknown error"}`);
      this.render();
    };
    reader.readAsDataURL(file);
    this.render();
  }

  /** The message's content parts, in order. */
  parts() { return this.items.map((i) => ({type: KINDS[i.kind].part, [KINDS[i.kind].part]: {url: i.url}})); }

  /** Empty the list, returning what it held (to show in the sent message, or to `restore` on failure). */
  take() {
    const items = this.items;
    this.items = [];
    this.render();
    return items;
  }

  restore(items) { this.items = [...items, ...this.items]; this.render(); }
  clear() { this.items = []; this.refuse(""); this.render(); }

  /** A message about an attachment (empty: none); shown by the composer, not in the conversation. */
  refuse(message) {
    this.ui.alert.textContent = message;
    this.ui.alert.hidden = !message;
  }

  render() {
    this.ui.list.replaceChildren(...this.items.filter((i) => i.url !== null).map((item) => {
      const li = document.createElement("li");
      li.className = "attachment";
      const caption = document.createElement("span");
      caption.textContent = `${item.name}, ${formatBytes(item.size)}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove ${item.name}`);
      remove.addEventListener("click", () => {
        this.items = this.items.filter((i) => i !== item);
        this.render();
      });
      li.append(mediaElement(item, `${item.kind === "image" ? "Image" : "Video"} to send: ${item.name}`), caption,
                remove);
      return li;
    }));
    this.ui.list.hidden = this.items.length === 0;
    this.refreshPickers();
  }

  /** Each picker is off once its kind's limit is reached; the note says why. */
  refreshPickers() {
    if (!this.limits) return;
    const notes = [];
    for (const [kind, {count}] of Object.entries(KINDS)) {
      const limit = this.limits[count], full = this.used(kind) >= limit;
      this.ui.pickers[kind].disabled = full;
      if (limit === 0) notes.push(`no ${kind}s on this server`);
      else if (full) notes.push(`${plural(limit, kind)} per conversation, all used (New chat for more)`);
    }
    const none = Object.values(KINDS).every(({count}) => this.limits[count] === 0);
    this.ui.note.textContent = none ? "this server takes text only" : notes.length ? notes.join("; ")
      : "or drop / paste them here";
  }
}
