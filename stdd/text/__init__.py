"""Text side of STDD: ASKG construction (LLM pipeline, schema) and prompt lists."""
