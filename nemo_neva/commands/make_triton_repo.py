"""Write a Triton model repository that serves an exported Hugging Face folder with TensorRT-LLM's LLM-API
(PyTorch) backend.

    neva-export-hf --nemo-path IN.nemo --output-dir HF_DIR
    neva-triton-repo --hf-dir HF_DIR --repo-dir REPO \\
        --backend-dir /app/tensorrt_llm/triton_backend/all_models/llmapi/tensorrt_llm/1
    tritonserver --model-repository REPO      # in nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3
    curl -X POST localhost:8000/v2/models/tensorrt_llm/generate \\
        -d '{"text_input": "...", "sampling_param_max_tokens": 64}'

REPO/tensorrt_llm/config.pbtxt and 1/model.yaml follow the backend's template (nemo_neva/export/triton_llmapi_repo.py);
the backend's model.py / helpers.py come from TensorRT-LLM (--backend-dir, or copy them into REPO/tensorrt_llm/1
yourself). The model takes text prompts only; images: `trtllm-serve HF_DIR` (OpenAI API with image_url).
"""
import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="folder written by neva-export-hf")
    ap.add_argument("--repo-dir", required=True, help="new (or empty) folder for the model repository")
    ap.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs (default 1)")
    ap.add_argument("--max-batch-size", type=int, default=8,
                    help="requests the engine batches in flight (LLM API max_batch_size; default 8)")
    ap.add_argument("--streaming", action="store_true", help="decoupled model: token-by-token responses")
    ap.add_argument("--backend-dir", default=None,
                    help="TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1: its model.py and "
                         "helpers.py are copied into the repository")
    args = ap.parse_args(argv)
    if args.max_batch_size < 1:
        ap.error("--max-batch-size must be at least 1")

    from nemo_neva.export.triton_llmapi_repo import RepoError, write_triton_repo

    try:
        out = write_triton_repo(args.hf_dir, args.repo_dir, args.tp_size, args.max_batch_size, args.streaming,
                                args.backend_dir)
    except (RepoError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + ("" if args.backend_dir else
                            "; copy TensorRT-LLM's model.py and helpers.py into tensorrt_llm/1 (or use --backend-dir)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
