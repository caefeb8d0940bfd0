"""LlamaIndex bridge (extra ``llama-index``: llama-index-core 0.14).

- :class:`FedRagRetriever`: the fine-tuned query encoder + knowledge store as a LlamaIndex
  retriever (``NodeWithScore`` with the passage id, document id and metadata);
- :class:`FedRagLLM`: the fine-tuned generator as a LlamaIndex completion LLM (the chat
  template it was trained with is applied, greedy decoding as in fedrag_ray);
- :func:`as_query_engine`: both in a ``RetrieverQueryEngine`` that prompts with the
  run's own ``rag.prompt_template`` and puts all passages in one prompt
  (``simple_summarize``, as fedrag_ray does), counting tokens with the generator's
  tokenizer rather than LlamaIndex's default tiktoken;
- :func:`passages_from_nodes` / :func:`nodes_to_store`: LlamaIndex documents or nodes
  (e.g. ``SimpleDirectoryReader(...).load_data()``) into a fedrag_ray knowledge store.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from llama_index.core import PromptTemplate
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import ResponseMode, get_response_synthesizer
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle, TextNode
from pydantic import PrivateAttr

from fedrag_ray.data import Passage
from fedrag_ray.integrations.store import check_passages, jsonable, passages_to_store
from fedrag_ray.knowledge_store import KnowledgeStore


def passage_node(passage: Passage) -> TextNode:
    """A node whose LLM and embedding text is the passage alone (metadata kept aside),
    so the generator sees exactly what it was trained on."""
    meta = {"doc_id": passage.doc_id, **passage.metadata}
    return TextNode(
        id_=passage.id,
        text=passage.text,
        metadata=meta,
        excluded_llm_metadata_keys=list(meta),
        excluded_embed_metadata_keys=list(meta),
    )


class FedRagRetriever(BaseRetriever):
    """Top-k passages from the system's knowledge store for the fine-tuned query encoder."""

    def __init__(self, system: Any, k: int | None = None, **kwargs: Any) -> None:
        if system.store is None:
            raise ValueError("FedRagRetriever: the system has no knowledge store")
        self._system = system
        self._k = k or system.cfg.rag.top_k
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        scores, idx = self._system.retrieve([query_bundle.query_str], self._k)
        store = self._system.store
        return [
            NodeWithScore(node=passage_node(store.passages[i]), score=float(s))
            for s, i in zip(scores[0], idx[0], strict=True)
            if i >= 0
        ]


class FedRagLLM(CustomLLM):
    """The fine-tuned generator as a LlamaIndex LLM (completion, not chat)."""

    max_new_tokens: int | None = None
    _system: Any = PrivateAttr()

    def __init__(self, system: Any, max_new_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(max_new_tokens=max_new_tokens, **kwargs)
        self._system = system

    @property
    def metadata(self) -> LLMMetadata:
        cfg = self._system.cfg
        return LLMMetadata(
            context_window=cfg.generator.max_length,
            num_output=self.max_new_tokens or cfg.rag.max_new_tokens,
            is_chat_model=False,
            model_name=f"fedrag_ray:{cfg.generator.model}",
        )

    def _generate(self, prompt: str, formatted: bool) -> str:
        if not formatted and self.completion_to_prompt is not None:
            prompt = self.completion_to_prompt(prompt)
        gen = self._system.generator
        return gen.generate([gen.format_prompt(prompt)], self.metadata.num_output)[0]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._generate(prompt, formatted))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        text = self._generate(prompt, formatted)  # greedy decoding: one chunk
        yield CompletionResponse(text=text, delta=text)


def qa_template(system: Any) -> PromptTemplate:
    """The run's ``rag.prompt_template`` with LlamaIndex's variable names."""
    template = system.cfg.rag.prompt_template
    return PromptTemplate(
        template.replace("{passage}", "{context_str}").replace("{question}", "{query_str}")
    )


def as_query_engine(
    system: Any, k: int | None = None, max_new_tokens: int | None = None
) -> RetrieverQueryEngine:
    """A query engine answering with the fine-tuned generator over the fine-tuned
    retriever; ``response.source_nodes`` are the passages it used."""
    llm = FedRagLLM(system, max_new_tokens=max_new_tokens)
    tok = system.generator.tokenizer
    helper = PromptHelper.from_llm_metadata(
        llm.metadata, tokenizer=lambda s: tok(s, add_special_tokens=False)["input_ids"]
    )
    synth = get_response_synthesizer(
        llm=llm,
        prompt_helper=helper,
        text_qa_template=qa_template(system),
        response_mode=ResponseMode.SIMPLE_SUMMARIZE,
    )
    return RetrieverQueryEngine.from_args(
        FedRagRetriever(system, k or system.cfg.rag.generate_passages),
        llm=llm,
        response_synthesizer=synth,
    )


def passages_from_nodes(nodes: Iterable[BaseNode]) -> list[Passage]:
    """LlamaIndex documents / nodes → passages: id = node id, doc id = the source
    document's id (``ref_doc_id``) when the node was split from one, text = its content
    without metadata."""
    out = []
    for node in nodes:
        if not isinstance(node, BaseNode):
            raise TypeError(f"expected LlamaIndex documents or nodes, got {type(node).__name__}")
        out.append(
            Passage(
                id=str(node.node_id),
                text=node.get_content(),
                doc_id=str(node.ref_doc_id or node.node_id),
                metadata=jsonable(dict(node.metadata)),
            )
        )
    return check_passages(out, "LlamaIndex documents")


def nodes_to_store(
    nodes: Iterable[BaseNode], system: Any, store: KnowledgeStore | None = None
) -> KnowledgeStore:
    """Embed LlamaIndex documents / nodes into ``store`` (or a new store that becomes the
    system's) with the system's passage encoder."""
    return passages_to_store(system, passages_from_nodes(nodes), store)
