from setuptools import find_packages, setup

setup(
    name="nemo_neva",
    version="0.1.0",
    description="NeVA (LLaVA-style vision-language model) as a NeMo plugin on megatron-core",
    packages=find_packages(include=["nemo_neva", "nemo_neva.*"]),
    package_data={"nemo_neva.serving": ["page/*.html", "page/*.js", "page/*.css"]},  # the chat page
    python_requires=">=3.10",
    # torch is installed first, pinned to the CPU wheel, by the Makefile; never let this pull a CUDA build.
    install_requires=[
        "torch>=2.4",
        # exactly the tested range (nemo_neva/compat/mcore_range.py refuses others at import)
        "megatron-core>=0.16.1,<0.20",
        "nemo_toolkit[core,common-only]>=3.0,<4",
        "transformers>=5,<6",
        "lightning>=2.4,<2.5",
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        "pillow",
        # video input (data/video_io.py): a manylinux wheel with FFmpeg inside, no system libraries
        "av>=18.1,<19",
        "safetensors",
        "psutil",
        "tensorboard",
        # examples/neva_serve.py's HTTP layer (the Makefile pins both); serving/http_server.py extends uvicorn's
        # h11 protocol, so uvicorn moves only with a test run.
        "fastapi>=0.115,<1",
        "uvicorn>=0.54,<0.55",
    ],
    extras_require={
        # openai: the client that drives the server tests; schemathesis fuzzes its OpenAPI schema;
        # playwright drives Debian's chromium (/usr/bin/chromium, `make install`) through the chat page.
        "test": ["pytest", "onnx", "onnxruntime", "openai==3.54.0", "schemathesis>=4.32,<5", "playwright>=1.65,<2", "peft==0.21.2"],
        # GPU users: transformer-engine / apex are used when importable, never required.
        "gpu": ["transformer-engine[pytorch]"],
        # scripts/launch_neva.py. nemo_run 0.11.1 imports leptonai's v1 API (gone in leptonai 0.47), and
        # leptonai / torchx pin old httpx / anyio / urllib3: the dev venv installs nemo_run, torchx and
        # leptonai==0.27.3 with --no-deps plus their light dependencies (see README, "Launching with NeMo-Run").
        "launch": ["nemo_run==0.11.1", "leptonai==0.27.3"],
        # Megatron-Energon datasets (model.data.data_path=<energon dataset>). The dev venv installs it with
        # --no-deps plus its light dependencies (Makefile): its s3fs pin would move fsspec past lightning's cap.
        "energon": ["megatron-energon>=7.4.1,<7.5"],
    },
)
