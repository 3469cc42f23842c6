"""Common layers: InnerProduct, Split and the routing/shape layers (Concat, Slice, Reshape, ...)."""
from __future__ import annotations

import torch

from ..layer import Layer, canonical_axis, register
from ..proto import caffe_pb2


@register("InnerProduct")
class InnerProductLayer(Layer):
    """y = x W^T + b over the axes from ``axis`` on (W is num_output x K, or K x num_output with
    ``transpose``)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    # it writes its top and its bottom diff into their own memory (Blob.mutable_data_t), reused
    # across passes as in Caffe (eagerly; compiled graphs hand over new tensors)

    def layer_setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = canonical_axis(p.axis, bottom[0].num_axes, self)
        k = bottom[0].count(self.axis)
        w_shape = (k, self.num_output) if self.transpose else (self.num_output, k)
        shapes = [w_shape] + ([(self.num_output,)] if self.bias_term else [])
        self.init_weight_and_bias(shapes, p.weight_filler, p.bias_filler)
        self.k = k

    def reshape(self, bottom, top):
        k = bottom[0].count(self.axis)
        if k != self.k:
            raise self.error(f"input size incompatible with inner product parameters: bottom "
                             f"{bottom[0].shape} gives {k} inputs per row from axis {self.axis}, "
                             f"the weights expect {self.k}")
        top[0].reshape(bottom[0].shape[:self.axis] + (self.num_output,))

    def _weight(self) -> torch.Tensor:
        w = self.param_t(0)
        return w if self.transpose else w.t()  # (K, N)

    def _rows(self, blob) -> torch.Tensor:
        # explicit M (not -1): with K = 0 the row count would be ambiguous
        return blob.data_t.reshape(blob.count(0, self.axis), self.k)

    def _into(self, blob, dtype) -> bool:
        """Whether to write into ``blob``'s own memory: eagerly, in the blob's type."""
        return blob.dtype == dtype and not torch.compiler.is_compiling()

    def forward(self, bottom, top):
        x = self._rows(bottom[0])
        if self._into(top[0], x.dtype) and top[0] is not bottom[0]:
            y = top[0].mutable_data_t().view(x.shape[0], self.num_output)
            if self.bias_term:
                torch.addmm(self.param_t(1), x, self._weight(), out=y)
            else:
                torch.mm(x, self._weight(), out=y)
            return
        if self.bias_term:
            y = torch.addmm(self.param_t(1), x, self._weight())
        else:
            y = x @ self._weight()
        top[0].data_t = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff_t.reshape(top[0].count(0, self.axis), self.num_output)
        if self.param_propagate_down[0]:
            x = self._rows(bottom[0])
            wd = self.blobs[0].diff_t
            if wd.dtype != dy.dtype:  # mixed precision: the product in the compute type, summed in float32
                wd.add_(x.t() @ dy if self.transpose else dy.t() @ x)
            elif self.transpose:
                wd.addmm_(x.t(), dy)  # (K, N) += x^T dy
            else:
                wd.addmm_(dy.t(), x)  # (N, K) += dy^T x
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff_t.add_(dy.sum(0))
        if propagate_down[0]:
            if self._into(bottom[0], dy.dtype) and top[0] is not bottom[0]:
                torch.mm(dy, self._weight().t(), out=bottom[0].mutable_diff_t().view(dy.shape[0], self.k))
            else:
                bottom[0].diff_t = (dy @ self._weight().t()).reshape(bottom[0].shape)


@register("Split")
class SplitLayer(Layer):
    """Copies its bottom to every top (sharing memory); backward sums the tops' diffs.

    The net inserts these automatically where one blob feeds several layers.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        for t in top:
            if t is not bottom[0]:
                t.reshape_like(bottom[0])

    def forward(self, bottom, top):
        for t in top:
            t.share_data(bottom[0])  # as Caffe's ShareData

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            if top[0] is not bottom[0]:
                bottom[0].take_diff(top[0])  # the same values: shared (Caffe's ShareDiff)
            return
        # the sum goes into the bottom diff's own memory (reused across passes), unless a top is
        # the bottom itself (its diff is a term)
        fresh = any(t is bottom[0] for t in top)
        total = torch.add(top[0].diff_t, top[1].diff_t, out=None if fresh else bottom[0].mutable_diff_t())
        for t in top[2:]:
            total += t.diff_t
        if fresh:
            bottom[0].diff_t = total


# ---------------------------------------------------------------------------- shape helpers
def _zeros_like_blob(blob) -> torch.Tensor:
    return torch.zeros(blob.shape, dtype=blob.dtype, device=blob.device)


@register("Concat")
class ConcatLayer(Layer):
    """Joins its bottoms along ``axis`` (legacy ``concat_dim``); all other dims must agree."""

    min_bottom_blobs = 1
    exact_num_top_blobs = 1
    # it writes into its top's and its bottoms' diffs' own memory (Blob.mutable_data_t), reused
    # across passes as in Caffe

    def layer_setup(self, bottom, top):
        p = self.layer_param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("Either axis or concat_dim should be specified; not both.")

    def reshape(self, bottom, top):
        p = self.layer_param.concat_param
        num_axes = bottom[0].num_axes
        if p.HasField("concat_dim"):
            axis = p.concat_dim
            if axis >= num_axes:
                raise self.error(f"concat_dim {axis} out of range for a {num_axes}-D bottom "
                                 f"{bottom[0].shape}")
        else:
            axis = canonical_axis(p.axis, num_axes, self)
        self.axis = axis
        shape = list(bottom[0].shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != num_axes:
                raise self.error(f"All inputs must have the same #axes: bottom 0 has shape "
                                 f"{bottom[0].shape}, bottom {i} has shape {b.shape}")
            for j in range(num_axes):
                if j != axis and b.shape[j] != shape[j]:
                    raise self.error(f"All inputs must have the same shape, except at concat axis {axis}: "
                                     f"bottom 0 has shape {bottom[0].shape}, bottom {i} has shape {b.shape}")
            shape[axis] += b.shape[axis]
        top[0].reshape(shape)
        self.sizes = [b.shape[axis] for b in bottom]

    def forward(self, bottom, top):
        if len(bottom) == 1:
            top[0].share_data(bottom[0])  # Caffe shares the single bottom's data
            return
        xs = [b.data_t for b in bottom]
        if any(b is top[0] for b in bottom):
            top[0].data_t = torch.cat(xs, dim=self.axis)
        else:
            torch.cat(xs, dim=self.axis, out=top[0].mutable_data_t())

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff_t
        if len(bottom) == 1:
            if propagate_down[0] and bottom[0] is not top[0]:
                bottom[0].take_diff(top[0])  # as its forward shares the data
            return
        for b, g, down in zip(bottom, torch.split(dy, self.sizes, dim=self.axis), propagate_down):
            if down:
                if b is top[0]:
                    b.diff_t = g.contiguous()
                else:
                    b.mutable_diff_t().copy_(g)


class _AliasLayer(Layer):
    """A top that is the bottom's data under another shape (Caffe's ShareData/ShareDiff)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def forward(self, bottom, top):
        top[0].share_data(bottom[0])

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff_t = top[0].diff_t.reshape(bottom[0].shape)


@register("Flatten")
class FlattenLayer(_AliasLayer):
    """Collapses axes ``axis`` .. ``end_axis`` into one; the top aliases the bottom's data."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Flatten layer does not allow in-place computation.")
        p = self.layer_param.flatten_param
        n = bottom[0].num_axes
        start = canonical_axis(p.axis, n, self)
        end = canonical_axis(p.end_axis, n, self)
        shape = bottom[0].shape
        top[0].reshape(shape[:start] + (bottom[0].count(start, end + 1),) + shape[end + 1:])
        top[0].share_data(bottom[0])  # alias now, as Caffe's ShareData


@register("Reshape")
class ReshapeLayer(_AliasLayer):
    """Changes the shape (``shape`` with 0 = copy that dim, one -1 = infer) of the axes
    ``axis`` .. ``axis + num_axes``; the top aliases the bottom's data."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("Reshape layer does not allow in-place computation.")
        dims = list(self.layer_param.reshape_param.shape.dim)
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"new shape {dims} contains multiple -1 dims; at most a single (1) value "
                             f"of -1 may be specified")
        bad = [d for d in dims if d < -1]
        if bad:
            raise self.error(f"new shape {dims} has a negative dimension other than -1")
        self.inferred_axis = inferred[0] if inferred else -1
        self.constant_count = 1
        for d in dims:
            if d > 0:
                self.constant_count *= d
        self.dims = dims

    def reshape(self, bottom, top):
        p = self.layer_param.reshape_param
        b = bottom[0]
        n = b.num_axes
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"axis {p.axis} out of range for a {n}-D bottom {b.shape}")
        if p.num_axes < -1:
            raise self.error(f"num_axes must be >= 0, or -1 for all; got {p.num_axes}")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(f"end_axis = axis + num_axes = {end} is out of range for a {n}-D bottom "
                             f"{b.shape}")
        shape = list(b.shape[:start]) + list(self.dims) + list(b.shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(f"new shape {self.dims} contains a 0, but there was no corresponding "
                                 f"bottom axis to copy (bottom shape {b.shape})")
            shape[start + i] = b.shape[start + i]
        if self.inferred_axis >= 0:
            explicit = self.constant_count * b.count(0, start) * b.count(end)
            for i in self.copy_axes:
                explicit *= shape[start + i]
            if explicit == 0 or b.count() % explicit:
                raise self.error(f"bottom count ({b.count()}, shape {b.shape}) must be divisible by the "
                                 f"product of the specified dimensions ({explicit})")
            shape[start + self.inferred_axis] = b.count() // explicit
        count = 1
        for d in shape:
            count *= d
        if count != b.count():
            raise self.error(f"output count must match input count: new shape {tuple(shape)} "
                             f"({count}) vs bottom shape {b.shape} ({b.count()})")
        top[0].reshape(shape)
        top[0].share_data(bottom[0])  # alias now, as Caffe's ShareData


@register("Permute")
class PermuteLayer(Layer):
    """SSD's axis permutation (weiliu89/caffe, ``permute_param``): top axis i is bottom axis
    ``order[i]``. Unlisted axes follow the listed ones in their original order (the fork's
    completion: ``order: 0 2`` on a 4-D blob is 0 2 1 3). When the order is the identity the top
    shares the bottom's data, as the fork does."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        n = bottom[0].num_axes
        orders: list[int] = []
        for o in self.layer_param.permute_param.order:
            if o >= n:
                raise self.error(f"order {o} should be less than the number of axes of the bottom "
                                 f"(shape {bottom[0].shape})")
            if o in orders:
                raise self.error(f"there are duplicate orders in {list(self.layer_param.permute_param.order)}")
            orders.append(o)
        orders += [i for i in range(n) if i not in orders]
        self.order = tuple(orders)
        self.inverse = tuple(orders.index(i) for i in range(n))
        self.need_permute = self.order != tuple(range(n))
        if self.need_permute and top[0] is bottom[0]:
            raise self.error("Permute does not allow in-place computation.")

    def reshape(self, bottom, top):
        if bottom[0].num_axes != len(self.order):
            raise self.error(f"bottom shape {bottom[0].shape} has {bottom[0].num_axes} axes; the layer was "
                             f"set up for {len(self.order)}")
        top[0].reshape(tuple(bottom[0].shape[o] for o in self.order))

    def forward(self, bottom, top):
        x = bottom[0].data_t
        top[0].data_t = x.permute(self.order).contiguous() if self.need_permute else x

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            g = top[0].diff_t
            bottom[0].diff_t = g.permute(self.inverse).contiguous() if self.need_permute else g


@register("Softmax")
class SoftmaxLayer(Layer):
    """exp(x - max) / sum along ``axis``; may run in place (backward uses the output)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    replaces_tops = replaces_bottom_diffs = True

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self.layer_param.softmax_param.axis, bottom[0].num_axes, self)
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        self._y = None  # the last forward's, not kept beside the new one
        y = torch.softmax(bottom[0].data_t, dim=self.axis)
        self._y = y
        top[0].data_t = y

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff_t
            bottom[0].diff_t = torch.ops.aten._softmax_backward_data(dy, self._y, self.axis, dy.dtype)


@register("Slice")
class SliceLayer(Layer):
    """Splits its bottom along ``axis`` (legacy ``slice_dim``) at ``slice_point``s, or into equal
    parts when none are given."""

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        p = self.layer_param.slice_param
        b = bottom[0]
        n = b.num_axes
        if p.HasField("slice_dim"):
            axis = p.slice_dim
            if axis >= n:
                raise self.error(f"slice_dim {axis} out of range for a {n}-D bottom {b.shape}")
        else:
            axis = canonical_axis(p.axis, n, self)
        self.axis = axis
        dim = b.shape[axis]
        points = list(p.slice_point)
        if points:
            if len(points) != len(top) - 1:
                raise self.error(f"{len(points)} slice_point(s) given for {len(top)} tops "
                                 f"(needs one fewer slice_point than tops)")
            if len(top) > dim:
                raise self.error(f"{len(top)} tops for a slice axis of size {dim} (bottom {b.shape})")
            sizes, prev = [], 0
            for pt in points:
                if pt <= prev:
                    raise self.error(f"slice_points {points} must be positive and strictly increasing")
                sizes.append(pt - prev)
                prev = pt
            if prev > dim:
                raise self.error(f"slice_point {prev} out of range for axis {axis} of size {dim} "
                                 f"(bottom {b.shape})")
            sizes.append(dim - prev)
        else:
            if dim % len(top):
                raise self.error(f"Number of top blobs ({len(top)}) should evenly divide input slice "
                                 f"axis ({dim}) of bottom {b.shape}")
            sizes = [dim // len(top)] * len(top)
        self.sizes = sizes
        for t, s in zip(top, sizes):
            shape = list(b.shape)
            shape[axis] = s
            t.reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        if len(top) == 1:
            top[0].share_data(bottom[0])
            return
        for t, part in zip(top, torch.split(x, self.sizes, dim=self.axis)):
            t.data_t = part.contiguous()

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            if top[0] is not bottom[0]:
                bottom[0].take_diff(top[0])  # the same values: shared (Caffe's ShareDiff)
            return
        bottom[0].diff_t = torch.cat([t.diff_t for t in top], dim=self.axis)


@register("Tile")
class TileLayer(Layer):
    """Repeats the block of axes from ``axis`` on ``tiles`` times (top dim ``axis`` x tiles)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.tile_param
        if not p.HasField("tiles"):
            raise self.error("Number of tiles must be specified")
        if p.tiles <= 0:
            raise self.error(f"Number of tiles must be positive, got {p.tiles}")
        self.tiles = p.tiles

    def reshape(self, bottom, top):
        b = bottom[0]
        self.axis = canonical_axis(self.layer_param.tile_param.axis, b.num_axes, self)
        self.outer = b.count(0, self.axis)
        self.inner = b.count(self.axis)
        shape = list(b.shape)
        shape[self.axis] *= self.tiles
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data_t.reshape(self.outer, 1, self.inner)
        top[0].data_t = x.expand(self.outer, self.tiles, self.inner).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff_t.reshape(self.outer, self.tiles, self.inner)
            bottom[0].diff_t = dy.sum(1).reshape(bottom[0].shape)


_ELTWISE = caffe_pb2.EltwiseParameter


@register("Eltwise")
class EltwiseLayer(Layer):
    """Elementwise PROD, SUM (with one ``coeff`` per bottom) or MAX of bottoms of equal shape."""

    min_bottom_blobs = 2
    exact_num_top_blobs = 1
    replaces_tops = replaces_bottom_diffs = True

    def layer_setup(self, bottom, top):
        p = self.layer_param.eltwise_param
        if len(p.coeff) not in (0, len(bottom)):
            raise self.error(f"Eltwise Layer takes one coefficient per bottom blob "
                             f"({len(p.coeff)} coeff for {len(bottom)} bottoms)")
        if p.operation == _ELTWISE.PROD and len(p.coeff):
            raise self.error("Eltwise layer only takes coefficients for summation.")
        self.op = p.operation
        self.coeffs = list(p.coeff) if len(p.coeff) else [1.0] * len(bottom)
        self.stable_prod_grad = p.stable_prod_grad

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != bottom[0].shape:
                raise self.error(f"bottoms must have the same shape: bottom 0 has shape {bottom[0].shape}, "
                                 f"bottom {i} has shape {b.shape}")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])
        # SUM writes into its top's own memory unless the top is a bottom
        self.replaces_tops = self.op != _ELTWISE.SUM or any(b is top[0] for b in bottom)

    def forward(self, bottom, top):
        xs = [b.data_t for b in bottom]
        self._max_idx = None  # the last forward's, not kept beside the new one
        if self.op == _ELTWISE.PROD:
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
        elif self.op == _ELTWISE.SUM:
            y = None if self.replaces_tops else top[0].mutable_data_t()
            if y is None:
                y = xs[0] * self.coeffs[0] if self.coeffs[0] != 1 else xs[0].clone()
            else:  # into last pass's top
                torch.mul(xs[0], self.coeffs[0], out=y)
            for c, x in zip(self.coeffs[1:], xs[1:]):
                y.add_(x, alpha=c)
        else:
            # Ties between bottoms 0 and 1 go to 1; later bottoms win only when strictly greater.
            first = xs[0] > xs[1]
            idx = (~first).to(torch.uint8)
            y = torch.where(first, xs[0], xs[1])
            for i, x in enumerate(xs[2:], 2):
                better = x > y
                idx = torch.where(better, torch.full_like(idx, i), idx)
                y = torch.where(better, x, y)
            self._max_idx = idx
        top[0].data_t = y

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff_t
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == _ELTWISE.PROD:
                if self.stable_prod_grad:
                    others = [o.data_t for j, o in enumerate(bottom) if j != i]
                    g = others[0]
                    for o in others[1:]:
                        g = g * o
                    g = g * dy
                else:
                    g = top[0].data_t / b.data_t * dy
            elif self.op == _ELTWISE.SUM:
                if self.coeffs[i] == 1:
                    if b is not top[0]:
                        # the top's diff itself: shared (Caffe's ShareDiff), so the top's memory
                        # stays its own to write into at the next pass (Blob._writable)
                        b.take_diff(top[0])
                    continue
                g = dy * self.coeffs[i]
            else:
                g = torch.where(self._max_idx == i, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))
            b.diff_t = g


@register("BatchReindex")
class BatchReindexLayer(Layer):
    """top[i] = bottom[0][index[i]] along the first axis; indices come from bottom[1]."""

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index != 1

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            raise self.error(f"the index bottom must be 1-D, got shape {bottom[1].shape}")
        top[0].reshape((bottom[1].shape[0],) + bottom[0].shape[1:])

    def _indices(self, bottom) -> torch.Tensor:
        r = bottom[1].data_t
        n = bottom[0].shape[0]
        bad = (r < 0) | (r >= n)
        if r.numel() and bool(bad.any()):
            raise self.error(f"Index specified for reindex layer is out of range: indices must be in "
                             f"[0, {n}) for a bottom of shape {bottom[0].shape}, got "
                             f"{r[bad][:10].tolist()}")
        return r.long()  # truncation toward zero, as Caffe's static_cast<int>

    def forward(self, bottom, top):
        idx = self._indices(bottom)
        self._idx = idx
        top[0].data_t = bottom[0].data_t.index_select(0, idx)

    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 1 and propagate_down[1]:
            raise self.error("Cannot backprop to index.")
        if propagate_down[0]:
            g = _zeros_like_blob(bottom[0])
            g.index_add_(0, self._idx, top[0].diff_t)
            bottom[0].diff_t = g


@register("Filter")
class FilterLayer(Layer):
    """Keeps the items (first axis) of each data bottom whose selector (last bottom) is non-zero."""

    min_bottom_blobs = 2
    min_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index != self._selector_index  # the selector is not differentiable

    def layer_setup(self, bottom, top):
        self._selector_index = len(bottom) - 1
        if len(top) != len(bottom) - 1:
            raise self.error(f"needs one top per data bottom: {len(bottom)} bottoms (the last is the "
                             f"selector) but {len(top)} tops")
        self._first_reshape = True

    def reshape(self, bottom, top):
        sel = bottom[-1]
        for d in sel.shape[1:]:
            if d != 1:
                raise self.error(f"Selector blob dimensions must be singletons (1), except the first; "
                                 f"got shape {sel.shape}")
        for i, b in enumerate(bottom[:-1]):
            if b.shape[0] != sel.shape[0]:
                raise self.error(f"Each bottom should have the same 0th dimension as the selector blob: "
                                 f"bottom {i} has shape {b.shape}, the selector {sel.shape}")
        self._indices = torch.nonzero(sel.data_t.reshape(-1)).reshape(-1)
        # The first reshape (at setup) keeps the full batch: the selector may not be filled yet.
        num = bottom[0].shape[0] if self._first_reshape else int(self._indices.numel())
        self._first_reshape = False
        for t, b in zip(top, bottom[:-1]):
            t.reshape((num,) + b.shape[1:])

    def forward(self, bottom, top):
        for t, b in zip(top, bottom[:-1]):
            t.data_t = b.data_t.index_select(0, self._indices)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[len(bottom) - 1]:
            raise self.error("Filter layer cannot backpropagate to filter index inputs")
        for i, t in enumerate(top):
            if propagate_down[i]:
                g = _zeros_like_blob(bottom[i])
                g.index_copy_(0, self._indices, t.diff_t)
                bottom[i].diff_t = g


_REDUCTION = caffe_pb2.ReductionParameter


@register("Reduction")
class ReductionLayer(Layer):
    """SUM, ASUM, SUMSQ or MEAN over all axes from ``axis`` on, times ``coeff``."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        self.op = self.layer_param.reduction_param.operation

    def reshape(self, bottom, top):
        p = self.layer_param.reduction_param
        b = bottom[0]
        self.axis = canonical_axis(p.axis, b.num_axes, self)
        top[0].reshape(b.shape[:self.axis])
        self.num = b.count(0, self.axis)
        self.dim = b.count(self.axis)
        self.coeff = p.coeff / self.dim if self.op == _REDUCTION.MEAN else p.coeff

    def forward(self, bottom, top):
        x = bottom[0].data_t.reshape(self.num, self.dim)
        if self.op == _REDUCTION.ASUM:
            x = x.abs()
        elif self.op == _REDUCTION.SUMSQ:
            x = x * x
        top[0].data_t = (x.sum(1) * self.coeff).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = (top[0].diff_t.reshape(self.num, 1) * self.coeff)
        if self.op in (_REDUCTION.SUM, _REDUCTION.MEAN):
            dx = g.expand(self.num, self.dim)
        else:
            x = bottom[0].data_t.reshape(self.num, self.dim)
            dx = g * torch.sign(x) if self.op == _REDUCTION.ASUM else g * (2 * x)
        bottom[0].diff_t = dx.reshape(bottom[0].shape).contiguous()


@register("ArgMax")
class ArgMaxLayer(Layer):
    """Indices (and/or values) of the ``top_k`` largest entries per item, or along ``axis``.

    Ties are ordered as Caffe's sort of (value, index) pairs: the larger index first.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.argmax_param
        self.out_max_val = p.out_max_val
        self.top_k = p.top_k
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            raise self.error("top k must not be less than 1.")
        b = bottom[0]
        if self.has_axis:
            self.axis = canonical_axis(p.axis, b.num_axes, self)
            if self.top_k > b.shape[self.axis]:
                raise self.error(f"top_k ({self.top_k}) must be less than or equal to the dimension of "
                                 f"the axis ({b.shape[self.axis]} in bottom {b.shape})")
        elif self.top_k > b.count(1):
            raise self.error(f"top_k ({self.top_k}) must be less than or equal to the dimension of the "
                             f"flattened bottom blob per instance ({b.count(1)} in bottom {b.shape})")

    def reshape(self, bottom, top):
        b = bottom[0]
        if self.has_axis:
            shape = list(b.shape)
            shape[self.axis] = self.top_k
        else:
            shape = [1] * max(b.num_axes, 3)
            shape[0] = b.shape[0]
            shape[2] = self.top_k
            if self.out_max_val:
                shape[1] = 2
        top[0].reshape(shape)

    def _topk(self, x: torch.Tensor, dim: int):
        d = x.shape[dim]
        # A stable descending sort of the reversed axis puts larger indices first among ties.
        values, rev = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        k = self.top_k
        return values.narrow(dim, 0, k), (d - 1 - rev.narrow(dim, 0, k)).to(x.dtype)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        if self.has_axis:
            values, idx = self._topk(x, self.axis)
            y = values if self.out_max_val else idx
        else:
            values, idx = self._topk(x.reshape(x.shape[0], -1), 1)
            y = torch.stack([idx, values], 1) if self.out_max_val else idx
        top[0].data_t = y.reshape(top[0].shape).contiguous()

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("ArgMax has no backward (not implemented in Caffe)")


@register("Silence")
class SilenceLayer(Layer):
    """Consumes its bottoms (no tops); backward writes zero diffs."""

    min_bottom_blobs = 1
    exact_num_top_blobs = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff_t = _zeros_like_blob(b)


@register("Parameter")
class ParameterLayer(Layer):
    """Outputs its one param blob (shape ``parameter_param.shape``, zeros unless loaded)."""

    exact_num_bottom_blobs = 0
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        shape = tuple(self.layer_param.parameter_param.shape.dim)
        if not self.check_blobs([shape]):
            self.blobs = [self.new_blob(shape)]
        self.param_propagate_down = [True]
        top[0].reshape(shape)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        top[0].share_data(self.blobs[0])  # shares the param's memory, as Caffe's ShareData

    def backward(self, top, propagate_down, bottom):
        if self.param_propagate_down[0]:
            self.blobs[0].diff_t.add_(top[0].diff_t)


@register("Embed")
class EmbedLayer(Layer):
    """Looks up rows of a (input_dim x num_output) table by the integer values of the bottom."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return False  # the bottom holds indices

    def layer_setup(self, bottom, top):
        p = self.layer_param.embed_param
        self.num_output = p.num_output
        self.input_dim = p.input_dim
        if self.num_output <= 0:
            raise self.error("EmbedLayer num_output must be positive.")
        if self.input_dim <= 0:
            raise self.error("EmbedLayer input_dim must be positive.")
        self.bias_term = p.bias_term
        shapes = [(self.input_dim, self.num_output)] + ([(self.num_output,)] if self.bias_term else [])
        self.init_weight_and_bias(shapes, p.weight_filler, p.bias_filler)

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def forward(self, bottom, top):
        x = bottom[0].data_t.reshape(-1)
        idx = x.long()
        bad = (x < 0) | (x >= self.input_dim) | (idx.to(x.dtype) != x)
        if x.numel() and bool(bad.any()):
            raise self.error(f"embed input out of range or non-integer: indices must be integers in "
                             f"[0, {self.input_dim}), got {x[bad][:10].tolist()}")
        self._idx = idx
        y = self.blobs[0].data_t.index_select(0, idx)
        if self.bias_term:
            y = y + self.blobs[1].data_t
        top[0].data_t = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("Can't backpropagate to EmbedLayer input.")
        dy = top[0].diff_t.reshape(-1, self.num_output)
        if self.param_propagate_down[0]:
            self.blobs[0].diff_t.index_add_(0, self._idx, dy)
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff_t.add_(dy.sum(0))


# ------------------------------------------------------------------ fork layers (mobile nets)
@register("ShuffleChannel")
class ShuffleChannelLayer(Layer):
    """ShuffleNet's channel shuffle (farmingyard/ShuffleNet): the C = group * k channels, read as
    a (group, k) grid, are written transposed, (k, group): input channel g * k + j goes to output
    channel j * group + g. Backward applies the inverse permutation to the diff."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        self.group = self.layer_param.shuffle_channel_param.group
        if self.group <= 0:
            raise self.error(f"group must be greater than 0, got {self.group}")

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) < 2:
            raise self.error(f"bottom must have a channel axis (at least 2 axes), got shape {shape}")
        if shape[1] % self.group:
            raise self.error(f"wrong group size: {shape[1]} channels (bottom shape {shape}) are not "
                             f"a multiple of group {self.group}")
        if top[0] is not bottom[0]:
            top[0].reshape(shape)

    @staticmethod
    def _shuffle(x: torch.Tensor, rows: int) -> torch.Tensor:
        """Channels read as a (rows, C / rows) grid, written transposed."""
        n, c = x.shape[:2]
        return x.reshape(n, rows, c // rows, -1).transpose(1, 2).reshape(x.shape)

    def forward(self, bottom, top):
        top[0].data_t = self._shuffle(bottom[0].data_t, self.group)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff_t
            bottom[0].diff_t = self._shuffle(dy, dy.shape[1] // self.group)


@register("Axpy")
class AxpyLayer(Layer):
    """SENet-caffe's Axpy: top = a * x + y with bottoms a (N, C) or (N, C, 1, 1), x and y
    (N, C, H, W) of one shape; a scales each channel of x. Backward: da = sum over H, W of
    dtop * x, dx = a * dtop, dy = dtop."""

    exact_num_bottom_blobs = 3
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        a, x, y = (b.shape for b in bottom)
        if len(x) < 2 or a[:2] != x[:2] or any(d != 1 for d in a[2:]):
            raise self.error(f"the scale bottom must be (N, C) or (N, C, 1, 1) with the N and C of "
                             f"x: scale shape {a}, x shape {x}")
        if x != y:
            raise self.error(f"x and y must have the same shape: x shape {x}, y shape {y}")
        top[0].reshape(x)

    def _scale(self, a: torch.Tensor, x_shape) -> torch.Tensor:
        return a.reshape(x_shape[:2] + (1,) * (len(x_shape) - 2))

    def forward(self, bottom, top):
        x = bottom[1].data_t
        top[0].data_t = torch.addcmul(bottom[2].data_t, self._scale(bottom[0].data_t, x.shape), x)

    def backward(self, top, propagate_down, bottom):
        dtop = top[0].diff_t
        x = bottom[1].data_t
        if propagate_down[0]:
            da = (dtop * x).reshape(x.shape[0], x.shape[1], -1).sum(2)
            bottom[0].diff_t = da.reshape(bottom[0].shape)
        if propagate_down[1]:
            bottom[1].diff_t = dtop * self._scale(bottom[0].data_t, x.shape)
        if propagate_down[2]:
            bottom[2].diff_t = dtop.clone() if top[0] is not bottom[2] else dtop
