"""TRL's dataset preparation, done once per data and settings into the tokenized-data cache.

TRL's SFTTrainer and DPOTrainer tokenize their datasets in their constructors (chat template,
EOS, tokenizing, labels, truncation, dropping rows left with nothing to learn), in every
process of every attempt. `CachedPreparation`, mixed in before the TRL class, sends each
split through `datacache.tokenized` instead: the first process of each node runs TRL's own
`_prepare_dataset` into `<output>/.cache/<key>/` while the others wait; every process then
reads the prepared rows memory-mapped, and a resumed run or a later attempt reads them
without tokenizing at all. The key covers the data's fingerprint, the tokenizer (its chat
template included), the split, TRL's version and every TRL argument that shapes the prepared
rows (PREPARATION_ARGUMENTS), plus what the method adds (`cache_settings`, e.g. dpo's
maxPromptLength), so a change of any of them prepares a new entry.

TRL lets its main process go first around the preparation (barriers on every rank). Here
the builder runs it alone while the other ranks already wait at the cache's barrier, where
TRL's barriers would release them before the entry exists; so TRL's ordering is switched
off for the builder's call, which runs alone anyway.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import trl
from datasets import Dataset

from kubetrain_trainer.datacache import cache_key, tokenized

log = logging.getLogger(__name__)

# The TRL arguments (SFTConfig, DPOConfig) that change what preparation writes.
PREPARATION_ARGUMENTS = (
    "max_length",
    "truncation_mode",
    "packing",
    "packing_strategy",
    "eval_packing",
    "padding_free",
    "dataset_text_field",
    "assistant_only_loss",
    "completion_only_loss",
    "chat_template_path",
    "shuffle_dataset",
    "seed",
)
# TRL's context manager that orders the ranks around preparation (trl.trainer.utils).
TRL_ORDERING = "global_then_local_main_first"


class CachedPreparation:
    """Mixin for a TRL trainer: `_prepare_dataset` through the tokenized-data cache.

    Extra constructor arguments: `data_fingerprint` (data.LoadedData.fingerprint),
    `cache_settings` (what else the prepared rows depend on) and `before_preparation`
    (a function of the raw rows run inside the cached build, e.g. dpo's prompt clipping).
    After construction `rows_dropped` maps each split to the rows preparation removed.
    """

    def __init__(
        self,
        *args: Any,
        data_fingerprint: str,
        cache_settings: dict[str, Any] | None = None,
        before_preparation: Callable[[Dataset], Dataset] | None = None,
        **kwargs: Any,
    ) -> None:
        self._data_fingerprint = data_fingerprint
        self._cache_settings = cache_settings or {}
        self._before_preparation = before_preparation
        self.rows_dropped: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: Any, *rest: Any):
        split = rest[-1]  # TRL passes the dataset's name ("train", "eval") last
        prepare = super()._prepare_dataset  # type: ignore[misc]
        if not isinstance(dataset, Dataset):  # an IterableDataset streams; nothing to cache
            return prepare(dataset, processing_class, args, *rest)
        settings = {name: getattr(args, name, None) for name in PREPARATION_ARGUMENTS}
        key = cache_key(
            self._data_fingerprint,
            processing_class,
            trainer=type(self).__name__,
            trl=trl.__version__,
            split=split,
            **settings,
            **self._cache_settings,
        )

        def build() -> dict[str, Dataset | None]:
            rows = self._before_preparation(dataset) if self._before_preparation else dataset
            with _trl_ordering_off(prepare):
                return {split: prepare(rows, processing_class, args, *rest)}

        prepared = tokenized(args.output_dir, key, build, args)[split]
        self.rows_dropped[split] = dropped = len(dataset) - len(prepared)
        if dropped:
            log.warning(
                "%s: %d of %d rows dropped: truncation to data.maxLength=%s left them nothing "
                "to learn (raise maxLength to keep them)",
                split, dropped, len(dataset), args.max_length,
            )  # fmt: skip
        return prepared


@contextlib.contextmanager
def _trl_ordering_off(prepare: Callable) -> Iterator[None]:
    """Make TRL's main-process-first ordering a no-op in the module `prepare` comes from."""
    module = sys.modules[prepare.__func__.__module__]
    if not hasattr(module, TRL_ORDERING):
        raise RuntimeError(
            f"{module.__name__} no longer has {TRL_ORDERING}: this TRL orders its preparation "
            "otherwise; kubetrain_trainer.prepared must follow it"
        )
    ordering = getattr(module, TRL_ORDERING)
    setattr(module, TRL_ORDERING, contextlib.nullcontext)
    try:
        yield
    finally:
        setattr(module, TRL_ORDERING, ordering)
