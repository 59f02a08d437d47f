"""rag: the top-k passages for the request's question, by BM25 over a corpus folder."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import bm25s

from promptpipe.contract.spec import RagSpec
from promptpipe.runtime.stage import Call
from promptpipe.v1 import stage_pb2

log = logging.getLogger(__name__)

CORPUS_SUFFIXES = (".txt", ".md", ".rst")


def split_passages(text: str, max_chars: int) -> list[str]:
    """Paragraphs, merged up to `max_chars`; an overlong paragraph is cut on words."""
    out: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        para = paragraph.strip()
        if not para:
            continue
        while len(para) > max_chars:
            cut = para.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(para[:cut].strip())
            para = para[cut:].strip()
        if current and len(current) + len(para) + 2 > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def load_corpus(folder: Path, max_chars: int) -> list[tuple[str, str]]:
    """(source, passage) pairs from every text file below `folder`, in a stable order.

    Hidden files and folders are skipped: a ConfigMap mounted in a pod holds each file twice, once
    under a hidden timestamped folder (`..2026_12_01_...`, reached through `..data`) and once as a
    link to it, and only the link is the file."""
    passages: list[tuple[str, str]] = []
    found = (p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in sorted(p for p in found if p.suffix in CORPUS_SUFFIXES and p.is_file()):
        source = str(path.relative_to(folder))
        passages.extend((source, chunk) for chunk in split_passages(path.read_text(encoding="utf-8"), max_chars))
    return passages


class Bm25Index:
    def __init__(self, passages: list[tuple[str, str]]) -> None:
        self.passages = passages
        self._retriever = bm25s.BM25()
        if passages:
            self._retriever.index(
                bm25s.tokenize([t for _, t in passages], stopwords="en", show_progress=False), show_progress=False
            )

    def search(self, query: str, k: int) -> list[stage_pb2.Passage]:
        k = min(k, len(self.passages))
        if k == 0 or not query.strip():
            return []
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not any(len(ids) for ids in tokens.ids):
            return []
        docs, scores = self._retriever.retrieve(tokens, k=k, show_progress=False)
        return [
            stage_pb2.Passage(source=self.passages[int(i)][0], text=self.passages[int(i)][1], score=float(s))
            for i, s in zip(docs[0], scores[0], strict=True)
            if s > 0
        ]


def question_of(item: stage_pb2.WorkItem) -> str:
    for message in reversed(item.messages):
        if message.role == "user":
            return str(message.content)
    return ""


class RagHandler:
    def __init__(self, spec: RagSpec, corpus_dir: Path | None) -> None:
        self._spec = spec
        self._corpus_dir = corpus_dir
        self._index = Bm25Index([])

    async def start(self) -> None:
        if self._spec.enabled and self._corpus_dir is not None:
            passages = await asyncio.to_thread(load_corpus, self._corpus_dir, self._spec.chunk_chars)
            self._index = await asyncio.to_thread(Bm25Index, passages)
            log.info("indexed %d passages from %s", len(passages), self._corpus_dir)

    async def close(self) -> None:
        return None

    async def process(self, item: stage_pb2.WorkItem, call: Call) -> stage_pb2.WorkItem:
        if self._spec.enabled and self._spec.top_k:
            item.passages.extend(self._index.search(question_of(item), self._spec.top_k))
        return item
