"""The LLM side: the OpenAI-compatible client, the context budget and token estimates, summaries of a long history."""
