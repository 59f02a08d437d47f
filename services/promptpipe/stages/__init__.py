"""The stages behind the gateway: rag, assemble, inference, post. Each is a handler the runtime serves."""
