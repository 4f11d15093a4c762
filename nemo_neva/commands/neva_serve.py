"""Serve a .nemo NeVA model over an OpenAI-compatible HTTP API, with a chat page at `/`.

    neva-serve neva_model_file=M.nemo server.port=8000
    curl http://127.0.0.1:8000/v1/models      # or open http://127.0.0.1:8000/ in a browser
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import logging
import os

from nemo.core.config import hydra_runner

from nemo_neva import MegatronNevaModel
from nemo_neva.cli import CONF_DIR, user_errors
from nemo_neva.data.conversation import get_template

try:
    from nemo_neva.serving import ServerLimits, build_server
except ModuleNotFoundError as err:  # fastapi / uvicorn: the `serve` extra
    raise SystemExit(f"error: neva-serve needs {err.name}: pip install \"nemo_neva[serve]\"") from None


@hydra_runner(config_path=CONF_DIR, config_name="neva_serve")
@user_errors
def main(cfg) -> None:
    if not cfg.neva_model_file:
        raise ValueError("neva_model_file=... is required")
    limits = ServerLimits.from_cfg(cfg.server)  # config mistakes show before the model loads
    if cfg.conv_template:
        get_template(cfg.conv_template)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = MegatronNevaModel.restore_from(cfg.neva_model_file)
    template = cfg.conv_template or model.cfg.data.conv_template
    model_id = cfg.served_model_name or os.path.splitext(os.path.basename(cfg.neva_model_file))[0]
    server = build_server(model, template, limits, cfg.server.host, int(cfg.server.port), model_id)
    host, port = server.server_address[:2]
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(f"serving {model_id!r} (template {template}) on {base}/v1; chat page: {base}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
