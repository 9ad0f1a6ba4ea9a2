"""gptoss-cluster: router, replica deployment, CLI and client for serving gpt-oss (see DESIGN.md)."""
