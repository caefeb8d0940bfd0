"""LangChain bridge (extra ``langchain``: langchain-core 1.8).

- :class:`FedRagRetriever`: the fine-tuned query encoder + knowledge store as a LangChain
  retriever (``Document`` with the passage id, ``doc_id``, ``score`` and metadata);
- :class:`FedRagLLM`: the fine-tuned generator as a LangChain LLM (its chat template
  applied, greedy decoding, ``stop`` sequences honoured);
- :func:`rag_chain`: retriever → the run's own prompt, with passages fitted to the
  generator's length exactly as fedrag_ray does → LLM; ``invoke(question)`` returns
  ``{"question", "answer", "sources"}`` (the documents that were in the prompt);
- :func:`passages_from_documents` / :func:`documents_to_store`: LangChain documents
  (a loader's ``load()``, a text splitter's output, or a loader itself) into a
  fedrag_ray knowledge store.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document
from langchain_core.language_models.llms import LLM
from langchain_core.prompts import PromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from fedrag_ray.data import Passage
from fedrag_ray.integrations.store import check_passages, jsonable, passages_to_store
from fedrag_ray.knowledge_store import KnowledgeStore


def passage_document(passage: Passage, score: float | None = None) -> Document:
    meta: dict[str, Any] = {**passage.metadata, "id": passage.id, "doc_id": passage.doc_id}
    if score is not None:
        meta["score"] = score
    return Document(page_content=passage.text, metadata=meta, id=passage.id)


class FedRagRetriever(BaseRetriever):
    """Top-k passages from the system's knowledge store for the fine-tuned query encoder."""

    system: Any
    k: int | None = None

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        store = self.system.store
        if store is None:
            raise ValueError("FedRagRetriever: the system has no knowledge store")
        scores, idx = self.system.retrieve([query], self.k or self.system.cfg.rag.top_k)
        return [
            passage_document(store.passages[i], float(s))
            for s, i in zip(scores[0], idx[0], strict=True)
            if i >= 0
        ]


class FedRagLLM(LLM):
    """The fine-tuned generator as a LangChain LLM."""

    system: Any
    max_new_tokens: int | None = None

    @property
    def _llm_type(self) -> str:
        return "fedrag_ray"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.system.cfg.generator.model, "max_new_tokens": self._max_new()}

    def _max_new(self) -> int:
        return self.max_new_tokens or self.system.cfg.rag.max_new_tokens

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        gen = self.system.generator
        text = gen.generate([gen.format_prompt(prompt)], self._max_new())[0]
        for s in stop or []:
            text = text.split(s, 1)[0]
        return text


def rag_chain(system: Any, k: int | None = None, max_new_tokens: int | None = None) -> Runnable:
    """question → {"question", "answer", "sources"} through the bridges: retrieve k
    (default ``rag.generate_passages``), keep the passages that fit the prompt
    (fedrag_ray's context policy), fill ``rag.prompt_template``, generate."""
    retriever = FedRagRetriever(system=system, k=k or system.cfg.rag.generate_passages)
    llm = FedRagLLM(system=system, max_new_tokens=max_new_tokens)
    prompt = PromptTemplate.from_template(system.cfg.rag.prompt_template)

    def fit(x: dict[str, Any]) -> dict[str, Any]:
        texts = [d.page_content for d in x["retrieved"]]
        kept = system.fit_passages(x["question"], texts, llm._max_new())
        return {"question": x["question"], "passage": "\n".join(kept), "n": len(kept)}

    def answer(x: dict[str, Any]) -> dict[str, Any]:
        fitted = fit(x)
        text = (prompt | llm).invoke({"passage": fitted["passage"], "question": x["question"]})
        return {"question": x["question"], "answer": text, "sources": x["retrieved"][: fitted["n"]]}

    return {"retrieved": retriever, "question": RunnablePassthrough()} | RunnableLambda(answer)


def passages_from_documents(docs: Iterable[Document] | BaseLoader) -> list[Passage]:
    """LangChain documents → passages: id = ``Document.id`` (else ``metadata["id"]``,
    else ``source`` + position), doc id = ``metadata["source"]`` (chunks of one file
    share it) or the id."""
    if isinstance(docs, BaseLoader):
        docs = docs.lazy_load()
    out = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, Document):
            raise TypeError(f"expected LangChain documents, got {type(doc).__name__}")
        meta = dict(doc.metadata)
        source = meta.get("source")
        pid = doc.id or meta.get("id") or f"{source or 'doc'}#{i}"
        out.append(
            Passage(
                id=str(pid),
                text=doc.page_content,
                doc_id=str(meta.get("doc_id") or source or pid),
                metadata=jsonable(meta),
            )
        )
    return check_passages(out, "LangChain documents")


def documents_to_store(
    docs: Iterable[Document] | BaseLoader, system: Any, store: KnowledgeStore | None = None
) -> KnowledgeStore:
    """Embed LangChain documents into ``store`` (or a new store that becomes the
    system's) with the system's passage encoder."""
    return passages_to_store(system, passages_from_documents(docs), store)
