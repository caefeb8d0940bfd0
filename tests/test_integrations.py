"""The LlamaIndex and LangChain bridges, with the real libraries and a real fine-tuned run
(tiny): documents from each library's loader into a store, retrieved; a LlamaIndex query
engine and a LangChain chain answering through the bridges with their sources."""

from __future__ import annotations

import pytest
from shared_data import write_pubmedqa_items

from fedrag_ray.centralized import run_centralized
from fedrag_ray.config import config_from_dict
from fedrag_ray.export import load_run

DOCS = {
    "scurvy.txt": "Scurvy is caused by a lack of vitamin C in the diet.",
    "rickets.txt": "Rickets in children comes from too little vitamin D or calcium.",
    "insulin.txt": "Insulin is a hormone made by the pancreas that lowers blood sugar.",
    "malaria.txt": "Malaria parasites are spread by the bite of infected mosquitoes.",
    "aspirin.txt": "Aspirin inhibits platelets and lowers the risk of a second stroke.",
}
QUESTION = "Which vitamin prevents scurvy?"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """A fine-tuned (RALT, 2 steps) tiny system, loaded back from its run directory."""
    tmp = tmp_path_factory.mktemp("bridge")
    data = write_pubmedqa_items(tmp / "pqa_12.json", 12)
    cfg = config_from_dict(
        {
            "data": {"path": str(data), "max_train": 4, "max_eval": 2},
            "retriever": {"max_length": 64},
            "generator": {"model": "tiny-random", "max_length": 256},
            "rag": {"max_new_tokens": 6, "generate_passages": 2},
            "eval": {"generate": False, "closed_book": False},
            "train": {"method": "ralt", "batch_size": 2, "lr": 5e-2, "ralt": {"k": 1}},
        }
    )
    run_centralized(cfg, tmp / "run")
    return load_run(tmp / "run")


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (d / name).write_text(text)
    return d


# --------------------------------------------------------------------------- LlamaIndex


def test_llama_index_reader_documents_land_in_the_store_and_are_retrieved(system, docs_dir):
    from llama_index.core import SimpleDirectoryReader

    from fedrag_ray.integrations.llama_index import FedRagRetriever, nodes_to_store

    docs = SimpleDirectoryReader(str(docs_dir)).load_data()
    store = nodes_to_store(docs, system)
    assert system.store is store and len(store) == len(DOCS)
    assert {p.metadata["file_name"] for p in store.passages} == set(DOCS)
    hits = FedRagRetriever(system, k=2).retrieve(QUESTION)
    assert len(hits) == 2 and hits[0].score >= hits[1].score
    assert hits[0].node.metadata["file_name"] == "scurvy.txt"
    assert hits[0].node.get_content(metadata_mode="llm") == DOCS["scurvy.txt"]
    for q, name in [
        ("What do mosquitoes spread?", "malaria.txt"),
        ("pancreas hormone", "insulin.txt"),
    ]:
        assert FedRagRetriever(system, k=1).retrieve(q)[0].node.metadata["file_name"] == name


def test_llama_index_query_engine_answers_with_sources(system, docs_dir):
    from llama_index.core import SimpleDirectoryReader

    from fedrag_ray.integrations.llama_index import as_query_engine, nodes_to_store

    nodes_to_store(SimpleDirectoryReader(str(docs_dir)).load_data(), system)
    response = as_query_engine(system, k=2).query(QUESTION)
    ours = system.answer(QUESTION, k=2)  # fedrag_ray's own pipeline, same prompt
    assert [n.node.node_id for n in response.source_nodes] == [p.id for p in ours.passages]
    assert [n.score for n in response.source_nodes] == pytest.approx(ours.scores)
    assert response.response == (ours.answer or "Empty Response")  # LlamaIndex's empty text


def test_llama_index_llm_is_the_fine_tuned_generator(system):
    from fedrag_ray.integrations.llama_index import FedRagLLM

    llm = FedRagLLM(system, max_new_tokens=5)
    assert llm.metadata.context_window == 256 and llm.metadata.num_output == 5
    prompt = "context: Aspirin lowers stroke risk.\nquestion: Does aspirin help?\nanswer:"
    expected = system.generator.generate([system.generator.format_prompt(prompt)], 5)[0]
    assert llm.complete(prompt).text == expected
    assert "".join(r.delta for r in llm.stream_complete(prompt)) == expected


def test_llama_index_nodes_refused_with_a_reason(system):
    from llama_index.core import Document

    from fedrag_ray.integrations.llama_index import passages_from_nodes

    with pytest.raises(ValueError, match="document 1 .* has no text"):
        passages_from_nodes([Document(text="a", id_="x"), Document(text=" ", id_="y")])
    with pytest.raises(ValueError, match="duplicate document id 'x'"):
        passages_from_nodes([Document(text="a", id_="x"), Document(text="b", id_="x")])
    with pytest.raises(TypeError, match="got str"):
        passages_from_nodes(["text"])


# --------------------------------------------------------------------------- LangChain


def test_langchain_loader_documents_land_in_the_store_and_are_retrieved(system, docs_dir):
    from langchain_community.document_loaders import DirectoryLoader, TextLoader
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    from fedrag_ray.integrations.langchain import FedRagRetriever, documents_to_store

    loader = DirectoryLoader(str(docs_dir), glob="*.txt", loader_cls=TextLoader)
    store = documents_to_store(loader, system)  # a loader itself is accepted
    assert len(store) == len(DOCS)
    retriever = FedRagRetriever(system=system, k=2)
    docs = retriever.invoke(QUESTION)
    assert len(docs) == 2 and docs[0].metadata["source"].endswith("scurvy.txt")
    assert docs[0].page_content == DOCS["scurvy.txt"]
    assert docs[0].metadata["score"] >= docs[1].metadata["score"]

    # a splitter's chunks: one passage per chunk, the file as their document
    chunks = RecursiveCharacterTextSplitter(chunk_size=30, chunk_overlap=0).split_documents(
        loader.load()
    )
    assert len(chunks) > len(DOCS)
    store = documents_to_store(chunks, system)
    assert len(store) == len(chunks)
    assert len({p.doc_id for p in store.passages}) == len(DOCS)
    top = retriever.invoke("mosquitoes")[0]
    assert top.metadata["source"].endswith("malaria.txt") and "mosquitoes" in top.page_content


def test_langchain_chain_answers_with_sources(system, docs_dir):
    from langchain_community.document_loaders import DirectoryLoader, TextLoader

    from fedrag_ray.integrations.langchain import documents_to_store, rag_chain

    documents_to_store(
        DirectoryLoader(str(docs_dir), glob="*.txt", loader_cls=TextLoader).load(), system
    )
    out = rag_chain(system, k=2).invoke(QUESTION)
    ours = system.answer(QUESTION, k=2)
    assert out["question"] == QUESTION
    assert [d.id for d in out["sources"]] == [p.id for p in ours.passages]
    assert out["sources"][0].metadata["source"].endswith("scurvy.txt")
    assert out["answer"] == ours.answer


def test_langchain_llm_and_appending_to_a_store(system):
    from langchain_core.documents import Document

    from fedrag_ray.integrations.langchain import FedRagLLM, documents_to_store

    llm = FedRagLLM(system=system, max_new_tokens=5)
    prompt = "context: Aspirin lowers stroke risk.\nquestion: Does aspirin help?\nanswer:"
    expected = system.generator.generate([system.generator.format_prompt(prompt)], 5)[0]
    assert llm.invoke(prompt) == expected
    assert expected.strip()  # the tiny seeded model does generate words
    word = expected.split()[-1]
    assert llm.invoke(prompt, stop=[word]) == expected.split(word, 1)[0]

    store = documents_to_store(
        [Document(page_content="Goitre follows iodine lack.", id="g")], system
    )
    n = len(store)
    documents_to_store([Document(page_content="Beriberi is thiamine lack.", id="b")], system, store)
    assert len(store) == n + 1 and store.passages[-1].id == "b"
    with pytest.raises(ValueError, match="'b' is already in the knowledge store"):
        documents_to_store([Document(page_content="again", id="b")], system, store)
