"""Retrieval and QA over the stored library, and the LangChain integration."""
