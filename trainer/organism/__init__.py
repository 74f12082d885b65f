"""The model organism: a tiny Qwen2.5-VL with weak real perception, the instrument for quality claims."""
