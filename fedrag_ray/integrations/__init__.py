"""Bridges to LlamaIndex (``fedrag_ray.integrations.llama_index``, extra ``llama-index``)
and LangChain (``fedrag_ray.integrations.langchain``, extra ``langchain``).

Each bridge goes both ways: the fine-tuned system (a :class:`~fedrag_ray.rag.RAGSystem`,
e.g. from :func:`fedrag_ray.export.load_run`) as the library's retriever and LLM, and the
library's document objects (and its loaders' output) into a fedrag_ray knowledge store.
The submodules import their library; this package imports neither.
"""
