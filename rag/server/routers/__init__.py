"""One router per endpoint family; `rag.server.app` mounts them all."""
