"""Data layers: Input (blobs fed from Python), DummyData (filler-made tops) and Data (Datums read
from an LMDB or LevelDB database, transformed and prefetched in a background thread)."""
from __future__ import annotations

import weakref

import numpy as np
import torch
from google.protobuf.message import DecodeError

from .. import rng
from ..blob import Blob
from ..data.db import READ, DBError, get_db
from ..data.prefetch import Prefetcher
from ..data.transformer import DataTransformer, TransformError, warn_deprecated_transform_fields
from ..fillers import fill
from ..layer import Layer, register
from ..log import get_logger
from ..parallel import solver_rank_and_count
from ..proto import caffe_pb2

log = get_logger(__name__)


@register("Input")
class InputLayer(Layer):
    """Tops with fixed shapes (``input_param.shape``) whose data the user writes from Python."""

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        shapes = self.layer_param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"input_param must give 0, 1 or {len(top)} shapes, got {len(shapes)}")
        for i, t in enumerate(top):
            if len(shapes):
                t.reshape(tuple(shapes[0 if len(shapes) == 1 else i].dim))

    def reshape(self, bottom, top):
        pass  # shapes change only when the user reshapes the blobs

    def forward(self, bottom, top):
        pass


@register("DummyData")
class DummyDataLayer(Layer):
    """Tops of fixed shapes filled by fillers (default: constant 0).

    Constant fillers fill their tops once at setup; any other filler refills its top on every
    forward, as in Caffe.
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.dummy_data_param
        num_top = len(top)
        nf = len(p.data_filler)
        if nf not in (0, 1, num_top):
            raise self.error(f"Number of data fillers must be 0, 1 or equal to the number of tops: "
                             f"{num_top}; you specified {nf} data fillers.")
        legacy = bool(len(p.num) or len(p.channels) or len(p.height) or len(p.width))
        if legacy:
            if len(p.shape):
                raise self.error("Both shape and legacy fields (num, channels, height, width) were "
                                 "specified")
            for field in ("num", "channels", "height", "width"):
                k = len(getattr(p, field))
                if k not in (1, num_top):
                    raise self.error(f"Must specify '{field}' once, or once per top blob ({num_top}); "
                                     f"specified {k}.")
        elif len(p.shape) not in (1, num_top):
            raise self.error(f"Must specify 'shape' once, or once per top blob ({num_top}); "
                             f"specified {len(p.shape)}.")

        if nf == 0:
            fp = caffe_pb2.FillerParameter(type="constant", value=0)
            self.fillers = [fp]
        else:
            self.fillers = list(p.data_filler)
        for fp in self.fillers:
            try:
                fill(Blob((0,), self.dtype), fp)  # checks the filler's type, as Caffe's GetFiller
            except ValueError as e:
                raise self.error(str(e)) from None
        # Constant tops are filled here once; the others on every forward.
        self.refill = [f.type != "constant" for f in self.fillers]

        def pick(values, i):
            return values[0] if len(values) == 1 else values[i]

        for i, t in enumerate(top):
            if legacy:
                shape = tuple(pick(getattr(p, f), i) for f in ("num", "channels", "height", "width"))
            else:
                shape = tuple(pick(p.shape, i).dim)
            try:
                t.reshape(shape)
            except ValueError as e:
                raise self.error(str(e)) from None
        self._fill(top, constant=True)

    def _fill(self, top, constant: bool) -> None:
        for i, t in enumerate(top):
            fid = i if len(self.fillers) > 1 else 0
            if self.refill[fid] != constant:
                try:
                    fill(t, self.fillers[fid])
                except ValueError as e:
                    raise self.error(str(e)) from None

    def reshape(self, bottom, top):
        pass  # fixed shapes

    def forward(self, bottom, top):
        self._fill(top, constant=False)


class _BatchReader:
    """Reads and transforms batches; runs in the prefetch thread and never references the layer."""

    def __init__(self, db, cursor, transformer: DataTransformer, batch_size: int, output_labels: bool,
                 dtype: torch.dtype, pin: bool, where: str, rank: int = 0, world: int = 1,
                 shuffle_gen: np.random.Generator | None = None):
        self.db = db
        self.cursor = cursor
        self.transformer = transformer
        self.batch_size = batch_size
        self.output_labels = output_labels
        self.dtype = dtype
        self.np_dtype = transformer.dtype
        self.pin = pin
        self.where = where
        # Data parallelism (Caffe's DataLayer::Skip): solver `rank` of `world` keeps only the
        # records at stream positions rank, rank + world, ... (the stream wraps around the db).
        self.rank = rank
        self.world = world
        self.offset = 0
        # NVCaffe's data_param { cache: true shuffle: true }: the first pass reads the database in
        # order and keeps every record in memory; each later pass serves them from memory in a new
        # random order (shuffle_gen's draws).
        self.shuffle_gen = shuffle_gen
        self._cache: list[bytes] | None = [] if shuffle_gen is not None else None
        self._first_key: bytes | None = None
        self._order: np.ndarray | None = None  # set once the cache is complete
        self._pos = 0

    def advance(self) -> None:
        """Caffe's DataLayer::Next: step the cursor, wrapping around at the end."""
        self.offset += 1
        if self._order is not None:
            self._pos += 1
            if self._pos == len(self._order):
                self._reshuffle()
            return
        if self._cache is not None:
            if self._first_key is None:
                self._first_key = self.cursor.key()
            self._cache.append(self.cursor.value())
        self.cursor.next()
        if not self.cursor.valid():
            log.info("Restarting data prefetching from start.")
            self.cursor.seek_to_first()
        if self._cache is not None and self.cursor.key() == self._first_key:
            self._reshuffle()  # every record is in memory now (rand_skip: the ones before it too)

    def _reshuffle(self) -> None:
        self._order = self.shuffle_gen.permutation(len(self._cache))
        self._pos = 0

    def _record(self) -> bytes:
        return self._cache[self._order[self._pos]] if self._order is not None else self.cursor.value()

    def read_datum(self) -> caffe_pb2.Datum:
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(self._record())
        except DecodeError:
            where = f"cached record {self._order[self._pos]}" if self._order is not None \
                else f"record {self.cursor.key()!r}"
            raise DBError(f"{self.where}: {where} is not a Datum") from None
        return datum

    def next_record(self):
        """The next record of this solver's share (read_datum's message), the cursor moved past it."""
        while self.offset % self.world != self.rank:
            self.advance()
        record = self.read_datum()
        self.advance()
        return record

    def batch(self, data: torch.Tensor, labels: torch.Tensor | None):
        """The (data, labels) a batch hands over, in pinned memory for a CUDA net."""
        if self.pin:
            data = data.pin_memory()
            labels = labels.pin_memory() if labels is not None else None
        return data, labels

    def load_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        datums = [self.next_record() for _ in range(self.batch_size)]
        data = torch.from_numpy(self.transformer.transform_datums(datums))
        labels = None
        if self.output_labels:
            labels = torch.from_numpy(np.array([d.label for d in datums], dtype=self.np_dtype))
        return self.batch(data, labels)

    def close(self) -> None:
        try:
            self.cursor.close()
        finally:
            self.db.close()


class PrefetchingDataLayer(Layer):
    """Caffe's BasePrefetchingDataLayer: tops (data[, label]) filled from ``reader.load_batch()``,
    in a background thread keeping ``data_param.prefetch`` batches ready (0: loaded in forward).
    The thread holds the reader only, never the layer, and stops when the layer is collected, at
    exit, or on :meth:`close`. Subclasses build a reader in ``layer_setup`` and call
    :meth:`start_loading`; ``batch_errors`` are the reader's errors reported naming the layer."""

    exact_num_bottom_blobs = 0
    min_top_blobs = 1
    max_top_blobs = 2
    batch_errors: tuple[type[Exception], ...] = (TransformError,)
    _reader = None
    _prefetcher: Prefetcher | None = None
    _finalizer = None

    def start_loading(self, reader, on_exit=None) -> None:
        """Serve batches from ``reader``; ``on_exit`` (e.g. closing a database) runs when loading stops."""
        self._reader = reader
        depth = int(self.layer_param.data_param.prefetch)
        if depth > 0:
            self._prefetcher = Prefetcher(reader.load_batch, depth, name=f"recaffe-{self.type.lower()}-{self.name}",
                                          on_exit=on_exit)
            self._finalizer = weakref.finalize(self, self._prefetcher.close)
        elif on_exit is not None:
            self._finalizer = weakref.finalize(self, on_exit)

    def reshape(self, bottom, top):
        pass  # tops take each batch's shape in forward

    def forward(self, bottom, top):
        if self._reader is None:
            raise self.error("forward called before setup (or after close)")
        try:
            batch = self._prefetcher.get() if self._prefetcher is not None else self._reader.load_batch()
        except self.batch_errors as e:
            raise self.error(str(e)) from None
        for t, value in zip(top, batch):  # one top: the labels are not loaded
            t.reshape(tuple(value.shape))
            t.data_t = value.to(self.device, non_blocking=True) if self.device.type != "cpu" else value

    def close(self) -> None:
        """Stop the prefetch thread (the layer cannot forward afterwards)."""
        if self._finalizer is not None:
            self._finalizer()
        self._reader = None


@register("Data")
class DataLayer(PrefetchingDataLayer):
    """Datums from an LMDB or LevelDB (``data_param``), transformed by ``transform_param``.

    Tops: data (batch_size, C, H, W) and optionally label (batch_size,) as floats. The database
    is read in key order and wraps around at its end, ahead of compute (PrefetchingDataLayer).
    In data-parallel training
    (recaffe.parallel) a TRAIN layer of solver r of N reads records r, r+N, r+2N... as Caffe.
    """

    batch_errors = (TransformError, DBError)

    def __init__(self, param, dtype=torch.float32, device="cpu"):
        super().__init__(param, dtype=dtype, device=device)
        dp = param.data_param
        if not dp.source:
            raise self.error("data_param.source (the database path) is required")
        # Caffe opens the database when the layer is created.
        self._db = get_db(dp.backend)
        try:
            self._db.open(dp.source, READ)
        except DBError as e:
            raise self.error(str(e)) from None

    def _transform_param(self) -> caffe_pb2.TransformationParameter:
        """transform_param (data_param's deprecated transform fields are ignored, as in Caffe)."""
        tp = caffe_pb2.TransformationParameter()
        tp.CopyFrom(self.layer_param.transform_param)
        dp = self.layer_param.data_param
        warn_deprecated_transform_fields(self.name, "data_param", dp)
        if dp.force_encoded_color and not tp.force_gray:
            tp.force_color = True
        return tp

    def make_reader(self, reader_cls, output_labels: bool, **extra):
        """The batch reader of this layer: its transformer (random draws from a generator seeded by
        the global seed and the layer, so runs repeat exactly), its cursor after ``rand_skip``, and
        its share of the records in multi-solver training (TEST nets, only on the root solver, read
        everything, as Caffe)."""
        dp = self.layer_param.data_param
        batch_size = int(dp.batch_size)
        if batch_size <= 0:
            raise self.error("data_param.batch_size must be positive")
        where = f"{self._db.backend} {dp.source!r}"
        gen = rng.layer_generator(self.name, self.phase)
        try:
            transformer = DataTransformer(self._transform_param(), self.phase, gen, self.dtype)
        except TransformError as e:
            raise self.error(str(e)) from None
        try:
            cursor = self._db.new_cursor()
            if not cursor.valid():
                raise self.error(f"{where} holds no records")
            if dp.rand_skip:
                skip = int(gen.integers(dp.rand_skip))
                log.info("Skipping first %d data points.", skip)
                for _ in range(skip):
                    cursor.next()
                    if not cursor.valid():
                        cursor.seek_to_first()
        except DBError as e:  # a damaged database (its reader process reports it)
            raise self.error(str(e)) from None
        rank, world = (0, 1) if self.phase == caffe_pb2.TEST else solver_rank_and_count()
        return reader_cls(self._db, cursor, transformer, batch_size, output_labels, self.dtype,
                          pin=self.device.type == "cuda", where=where, rank=rank, world=world, **extra)

    def layer_setup(self, bottom, top):
        dp = self.layer_param.data_param
        shuffle = None
        if dp.shuffle and dp.cache:  # NVCaffe shuffles only what it caches
            shuffle = rng.layer_generator(self.name, self.phase, 1)
            log.info("Caching %s in memory and shuffling it at every pass after the first (NVCaffe's "
                     "cache and shuffle)", dp.source)
        elif dp.shuffle:
            log.info("data_param.shuffle without cache: NVCaffe then reads in database order, and so "
                     "does recaffe")
        reader = self.make_reader(_BatchReader, len(top) > 1, shuffle_gen=shuffle)
        transformer = reader.transformer
        try:
            shape = transformer.infer_blob_shape(reader.read_datum())
        except (TransformError, DBError) as e:
            raise self.error(str(e)) from None
        shape[0] = reader.batch_size
        top[0].reshape(shape)
        log.info("output data size: %d,%d,%d,%d", top[0].num, top[0].channels, top[0].height,
                 top[0].width)
        if len(top) > 1:
            top[1].reshape((reader.batch_size,))
        self.start_loading(reader, on_exit=reader.close)

    def close(self) -> None:
        """Stop the prefetch thread and close the database (the layer cannot forward afterwards)."""
        if self._finalizer is None and getattr(self, "_db", None) is not None:
            self._db.close()  # setup did not get as far as start_loading
        super().close()
