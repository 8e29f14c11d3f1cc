"""The encrypted-inference service and its clients: hosting, key store, work pool, HTTP, key maker."""
