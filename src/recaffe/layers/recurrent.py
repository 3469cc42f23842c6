"""Recurrent layers: RNN and LSTM (Caffe's RecurrentLayer family) and the LSTMUnit cell.

Bottoms of RNN/LSTM: ``x`` (T x N x ...), ``cont`` (T x N; 0 where a sequence starts, which
flushes the hidden state), optionally ``x_static`` (N x ..., added to every step's input), and
with ``expose_hidden`` the initial states (RNN: h_0; LSTM: h_0, c_0, each 1 x N x num_output).
Tops: the outputs (T x N x num_output), plus the final states with ``expose_hidden``.

Caffe builds an internal unrolled Net of InnerProduct/Eltwise/Scale/LSTMUnit layers with shared
weights. We run the same recurrence directly on tensors, step by step, keeping the unrolled
net's exact operations (``h_conted = cont_t * h_{t-1}`` then ``W * h_conted``; LSTMUnit's gate
math) and its parameter layout and fill order, so Caffe's ``.caffemodel`` files load as they are:

* LSTM: W_xc (4H x D), b_c (4H), [W_xc_static (4H x D_static)], W_hc (4H x H); gates i, f, o, g.
* RNN: W_xh (H x D), b_h (H), [W_xh_static (H x D_static)], W_hh (H x H), W_ho (H x H), b_o (H).

As in Caffe, without ``expose_hidden`` the state at the end of one forward is the initial state
of the next (``cont = 0`` at a sequence start is what resets it), and ``cont`` gets no gradient.

One deliberate difference: Caffe's RecurrentLayer only shares the *data* of the exposed state
blobs with its internal net, so it never writes a gradient into the h_0/c_0 bottoms and ignores
the diffs of the h_T/c_T tops. We backpropagate through them (the true gradient); where those
tops get no gradient (the usual case) every other diff equals Caffe's.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..blob import Blob
from ..fillers import fill
from ..layer import Layer, register
from ..log import get_logger

log = get_logger(__name__)


# ------------------------------------------------------------------------------ LSTM cell
def _caffe_tanh(x: torch.Tensor) -> torch.Tensor:
    """LSTMUnit's tanh, written through the sigmoid as Caffe's CPU code does."""
    return 2 * torch.sigmoid(2 * x) - 1


def _lstm_unit_forward(c_prev: torch.Tensor, gates: torch.Tensor, cont: torch.Tensor, hidden: int):
    """One LSTM step on (N, H) states and (N, 4H) gate inputs ordered i, f, o, g.

    ``f`` is ``cont * sigmoid(.)`` (exactly 0 where cont is 0), so a sequence start forgets
    c_prev. Returns c, h and what backward needs: the activations (N, 4H) and tanh(c)."""
    H = hidden
    cont = cont.reshape(-1, 1)
    i = torch.sigmoid(gates[:, :H])
    f = torch.where(cont == 0, torch.zeros((), dtype=gates.dtype, device=gates.device),
                    cont * torch.sigmoid(gates[:, H:2 * H]))
    o = torch.sigmoid(gates[:, 2 * H:3 * H])
    g = _caffe_tanh(gates[:, 3 * H:])
    c = f * c_prev + i * g
    tanh_c = _caffe_tanh(c)
    h = o * tanh_c
    return c, h, torch.cat([i, f, o, g], dim=1), tanh_c


def _lstm_unit_backward(dc: torch.Tensor, dh: torch.Tensor, c_prev: torch.Tensor, acts: torch.Tensor,
                        tanh_c: torch.Tensor, hidden: int):
    """Caffe's LSTMUnit::Backward_cpu: returns (dc_prev, dgates). The forget gate's derivative is
    taken as f(1-f) of the cont-scaled f, exactly as Caffe's CPU code (the same thing for 0/1
    cont)."""
    H = hidden
    i, f, o, g = acts[:, :H], acts[:, H:2 * H], acts[:, 2 * H:3 * H], acts[:, 3 * H:]
    c_term = dc + dh * o * (1 - tanh_c * tanh_c)
    dgates = torch.cat([c_term * g * i * (1 - i),
                        c_term * c_prev * f * (1 - f),
                        dh * tanh_c * o * (1 - o),
                        c_term * i * (1 - g * g)], dim=1)
    return c_term * f, dgates


@register("LSTMUnit")
class LSTMUnitLayer(Layer):
    """One LSTM step: bottoms c_prev (1 x N x H), gate inputs (1 x N x 4H, order i, f, o, g),
    cont (1 x N); tops c and h (1 x N x H). No params; ``cont`` gets no gradient."""

    exact_num_bottom_blobs = 3
    exact_num_top_blobs = 2

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def reshape(self, bottom, top):
        c_prev, x, cont = bottom
        want_axes = (3, 3, 2)
        names = ("c_prev", "gate input", "cont")
        for k, (b, n, name) in enumerate(zip(bottom, want_axes, names)):
            if b.num_axes != n:
                raise self.error(f"bottom[{k}] ({name}) must have {n} axes, got shape {b.shape}")
            if b.shape[0] != 1:
                raise self.error(f"bottom[{k}] ({name}) must hold a single timestep (shape[0] == 1), "
                                 f"got shape {b.shape}")
        n = c_prev.shape[1]
        for k, (b, name) in enumerate(zip(bottom, names)):
            if b.shape[1] != n:
                raise self.error(f"bottom[{k}] ({name}) shape {b.shape} does not match c_prev's "
                                 f"{n} streams (c_prev shape {c_prev.shape})")
        self.hidden = c_prev.shape[2]
        if x.shape[2] != 4 * self.hidden:
            raise self.error(f"gate input shape {x.shape} must have 4 x {self.hidden} = {4 * self.hidden} "
                             f"channels to match c_prev shape {c_prev.shape}")
        top[0].reshape(c_prev.shape)
        top[1].reshape(c_prev.shape)

    def forward(self, bottom, top):
        c_prev = bottom[0].data_t[0]
        c, h, _, _ = _lstm_unit_forward(c_prev, bottom[1].data_t[0], bottom[2].data_t[0], self.hidden)
        top[0].data_t = c.unsqueeze(0)
        top[1].data_t = h.unsqueeze(0)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("Cannot backpropagate to sequence indicators.")
        if not (propagate_down[0] or propagate_down[1]):
            return
        H = self.hidden
        c_prev, x, cont = bottom[0].data_t[0], bottom[1].data_t[0], bottom[2].data_t[0]
        # As Caffe, recompute the gates from the bottoms and tanh(c) from the top's data.
        _, _, acts, _ = _lstm_unit_forward(c_prev, x, cont, H)
        tanh_c = _caffe_tanh(top[0].data_t[0])
        dc_prev, dgates = _lstm_unit_backward(top[0].diff_t[0], top[1].diff_t[0], c_prev, acts, tanh_c, H)
        if propagate_down[0]:
            bottom[0].diff_t = dc_prev.reshape(bottom[0].shape)
        if propagate_down[1]:
            bottom[1].diff_t = dgates.reshape(bottom[1].shape)


# ------------------------------------------------------------------------ RecurrentLayer
class _RecurrentLayer(Layer):
    """What RNN and LSTM share: bottoms, the input transforms, state carrying, checks."""

    state_names: tuple[str, ...] = ()   # recurrent state blobs, in Caffe's bottom/top order
    gates = 1                           # rows of W_x per output unit (LSTM: 4)

    def __init__(self, param, dtype=torch.float32, device="cpu"):
        super().__init__(param, dtype=dtype, device=device)
        # Blob counts depend on expose_hidden (Caffe's Min/MaxBottomBlobs, ExactNumTopBlobs).
        n_exposed = len(self.state_names) if param.recurrent_param.expose_hidden else 0
        self.min_bottom_blobs = 2 + n_exposed
        self.max_bottom_blobs = 3 + n_exposed
        self.exact_num_top_blobs = 1 + n_exposed
        self._carried: list[torch.Tensor] | None = None
        self._cache = None

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1  # no gradient for the sequence continuation indicators

    # ------------------------------------------------------------------ setup
    def layer_setup(self, bottom, top):
        p = self.layer_param.recurrent_param
        self.expose_hidden = p.expose_hidden
        self.debug_info = p.debug_info
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 3:
            raise self.error(f"bottom[0] must have at least 3 axes -- (#timesteps, #streams, features...); "
                             f"got shape {x.shape}")
        self.T, self.N = x.shape[0], x.shape[1]
        log.info("Initializing recurrent layer: assuming input batch contains %d timesteps of %d "
                 "independent streams.", self.T, self.N)
        self._check_cont(x, cont)
        n_exposed = len(self.state_names) if self.expose_hidden else 0
        self.static_input = len(bottom) > 2 + n_exposed
        if self.static_input:
            self._check_static(x, bottom[2])
        if p.num_output <= 0:
            raise self.error("num_output must be positive")
        self.H = p.num_output
        self.D = x.count(2)
        self.D_static = bottom[2].count(1) if self.static_input else 0
        specs = self.param_specs()
        shapes = [shape for _, shape, _ in specs]
        if not self.check_blobs(shapes):
            # Caffe's unrolled net creates (and fills) the params in this same order.
            self.blobs = [self.new_blob(s) for s in shapes]
            for blob, (_, _, kind) in zip(self.blobs, specs):
                fill(blob, p.weight_filler if kind == "weight" else p.bias_filler)
        for i, (name, _, _) in enumerate(specs):
            log.info("Adding parameter %d: %s", i, name)
        self.param_propagate_down = [True] * len(self.blobs)
        # Index of the first recurrent param (after W_x, b and the optional W_x_static).
        self.rec = 3 if self.static_input else 2

    def param_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        raise NotImplementedError

    def _input_specs(self, w: str, b: str) -> list[tuple[str, tuple[int, ...], str]]:
        G = self.gates * self.H
        specs = [(w, (G, self.D), "weight"), (b, (G,), "bias")]
        if self.static_input:
            specs.append((w + "_static", (G, self.D_static), "weight"))
        return specs

    def _check_cont(self, x: Blob, cont: Blob) -> None:
        if cont.num_axes != 2 or cont.shape != x.shape[:2]:
            raise self.error(f"bottom[1] (cont) must have shape (#timesteps, #streams) = {x.shape[:2]} to "
                             f"match bottom[0] of shape {x.shape}; got shape {cont.shape}")

    def _check_static(self, x: Blob, x_static: Blob) -> None:
        if x_static.num_axes < 1 or x_static.shape[0] != x.shape[1]:
            raise self.error(f"bottom[2] (x_static) must have shape (#streams, ...) with #streams = "
                             f"{x.shape[1]} as bottom[0] of shape {x.shape}; got shape {x_static.shape}")

    def reshape(self, bottom, top):
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 3 or x.shape[0] != self.T:
            raise self.error(f"input number of timesteps changed: set up for {self.T} timesteps, "
                             f"bottom[0] now has shape {x.shape}")
        self._check_cont(x, cont)
        if x.count(2) != self.D:
            raise self.error(f"bottom[0] shape {x.shape} has {x.count(2)} features per step; the "
                             f"weights expect {self.D}")
        self.N = N = x.shape[1]
        if self.static_input:
            self._check_static(x, bottom[2])
            if bottom[2].count(1) != self.D_static:
                raise self.error(f"bottom[2] (x_static) shape {bottom[2].shape} has {bottom[2].count(1)} "
                                 f"features; the weights expect {self.D_static}")
        state_shape = (1, N, self.H)
        if self.expose_hidden:
            first = 2 + self.static_input
            for k, name in enumerate(self.state_names):
                b = bottom[first + k]
                if b.shape != state_shape:
                    raise self.error(f"bottom[{first + k}] ({name}_0) shape {b.shape} must match the hidden "
                                     f"state input shape {state_shape}")
        top[0].reshape(self.T, N, self.H)
        for t in top[1:]:
            t.reshape(state_shape)

    def reset(self) -> None:
        """Zero the state carried from one forward to the next (Caffe's RecurrentLayer::Reset)."""
        self._carried = None

    # ----------------------------------------------------------- shared math
    def _initial_state(self, bottom, like: torch.Tensor) -> list[torch.Tensor]:
        N, H = self.N, self.H
        if self.expose_hidden:
            first = 2 + self.static_input
            return [bottom[first + k].data_t[0] for k in range(len(self.state_names))]
        states = []
        for k in range(len(self.state_names)):
            prev = None if self._carried is None else self._carried[k].reshape(-1)
            if prev is None or prev.numel() < N * H:
                # Caffe's state blobs start (or regrow) as zeros; when N shrinks they keep a prefix.
                states.append(torch.zeros((N, H), dtype=like.dtype, device=like.device))
            else:
                states.append(prev[:N * H].reshape(N, H).to(dtype=like.dtype, device=like.device))
        return states

    def _input_transform(self, bottom) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W_x x + b for every step (T, N, G), and W_x_static x_static (N, G) or None."""
        G = self.gates * self.H
        x = bottom[0].data_t.reshape(self.T * self.N, self.D)  # explicit rows: D may be 0
        wx = torch.addmm(self.blobs[1].data_t, x, self.blobs[0].data_t.t()).reshape(self.T, self.N, G)
        ws = None
        if self.static_input:
            ws = bottom[2].data_t.reshape(self.N, self.D_static) @ self.blobs[2].data_t.t()
        return wx, ws

    def _input_backward(self, dpre: torch.Tensor, bottom, propagate_down) -> None:
        """Backward of the input transforms given d(gate input) for every step (T, N, G)."""
        G = self.gates * self.H
        ppd = self.param_propagate_down
        d2 = dpre.reshape(-1, G)
        if ppd[0]:
            self.blobs[0].diff_t.addmm_(d2.t(), bottom[0].data_t.reshape(self.T * self.N, self.D))
        if ppd[1]:
            self.blobs[1].diff_t.add_(d2.sum(0))
        if self.static_input and (ppd[2] or propagate_down[2]):
            ds = dpre.sum(0)  # x_static feeds every step
            if ppd[2]:
                self.blobs[2].diff_t.addmm_(ds.t(), bottom[2].data_t.reshape(self.N, self.D_static))
            if propagate_down[2]:
                bottom[2].diff_t = (ds @ self.blobs[2].data_t).reshape(bottom[2].shape)
        if propagate_down[0]:
            bottom[0].diff_t = (d2 @ self.blobs[0].data_t).reshape(bottom[0].shape)

    def _state_grads_wanted(self, propagate_down) -> list[bool]:
        if not self.expose_hidden:
            return [False] * len(self.state_names)
        first = 2 + self.static_input
        return [bool(propagate_down[first + k]) for k in range(len(self.state_names))]

    def _needs_backward(self, propagate_down) -> bool:
        return any(self.param_propagate_down) or any(
            propagate_down[i] for i in range(len(propagate_down)) if i != 1)

    def _write_state_grads(self, bottom, wanted: Sequence[bool], grads: Sequence[torch.Tensor]) -> None:
        first = 2 + self.static_input
        for k, (want, g) in enumerate(zip(wanted, grads)):
            if want:
                bottom[first + k].diff_t = g.reshape(bottom[first + k].shape)

    def _top_state_diff(self, top, k: int) -> torch.Tensor | None:
        """The diff of exposed final-state top k (N, H), or None (no gradient) without expose."""
        return top[1 + k].diff_t[0] if self.expose_hidden else None

    def _debug(self, direction: str, layer: str, what: str, t: torch.Tensor) -> None:
        """One of Caffe's Net debug lines for the unrolled net (mean absolute value)."""
        value = float(t.abs().mean()) if t.numel() else 0.0
        log.info("    [%s] Layer %s_%s, %s: %g", direction, self.name, layer, what, value)


@register("LSTM")
class LSTMLayer(_RecurrentLayer):
    """Long short-term memory over T steps (Caffe's LSTMLayer):

        gate_t = W_hc (cont_t * h_{t-1}) + W_xc x_t + b_c [+ W_xc_static x_static]
        i, f, o = sigmoid(gate_t parts), f scaled by cont_t; g = tanh(gate_t part)
        c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t)

    Top: h (T x N x H); with expose_hidden also h_T and c_T (bottoms h_0, c_0)."""

    state_names = ("h", "c")
    gates = 4

    def param_specs(self):
        return self._input_specs("W_xc", "b_c") + [("W_hc", (4 * self.H, self.H), "weight")]

    def forward(self, bottom, top):
        T, N, H = self.T, self.N, self.H
        x = bottom[0].data_t
        wx, ws = self._input_transform(bottom)
        cont = bottom[1].data_t
        h0, c0 = self._initial_state(bottom, x)
        w_hc = self.blobs[self.rec].data_t
        hs = x.new_empty((T + 1, N, H))
        cs = x.new_empty((T + 1, N, H))
        h_conted = x.new_empty((T, N, H))
        acts = x.new_empty((T, N, 4 * H))
        tanh_cs = x.new_empty((T, N, H))
        hs[0], cs[0] = h0, c0
        if self.debug_info:
            self._debug("Forward", "x_transform", "top blob W_xc_x data", wx)
        for t in range(T):
            cont_t = cont[t].reshape(N, 1)
            h_conted[t] = hs[t] * cont_t
            gate = h_conted[t] @ w_hc.t() + wx[t]   # Eltwise SUM in Caffe's bottom order
            if ws is not None:
                gate = gate + ws
            cs[t + 1], hs[t + 1], acts[t], tanh_cs[t] = _lstm_unit_forward(cs[t], gate, cont[t], H)
            if self.debug_info:
                self._debug("Forward", f"unit_{t + 1}", f"top blob c_{t + 1} data", cs[t + 1])
                self._debug("Forward", f"unit_{t + 1}", f"top blob h_{t + 1} data", hs[t + 1])
        self._cache = (cont, h_conted, cs, acts, tanh_cs)
        top[0].data_t = hs[1:].clone()
        if self.expose_hidden:
            top[1].data_t = hs[T].clone().unsqueeze(0)
            top[2].data_t = cs[T].clone().unsqueeze(0)
        else:
            self._carried = [hs[T].clone(), cs[T].clone()]

    def backward(self, top, propagate_down, bottom):
        if not self._needs_backward(propagate_down) or self._cache is None:
            return
        T, N, H = self.T, self.N, self.H
        cont, h_conted, cs, acts, tanh_cs = self._cache
        w_hc = self.blobs[self.rec].data_t
        want_h0, want_c0 = self._state_grads_wanted(propagate_down)
        d_top = top[0].diff_t
        zeros = torch.zeros((N, H), dtype=d_top.dtype, device=d_top.device)
        dh_next = self._top_state_diff(top, 0)
        dc = self._top_state_diff(top, 1)
        dh_next = zeros if dh_next is None else dh_next
        dc = zeros if dc is None else dc  # Caffe's c_T diff is 0: nothing consumes c_T inside
        dgates = d_top.new_empty((T, N, 4 * H))
        for t in range(T - 1, -1, -1):
            dh = d_top[t] + dh_next
            dc, dgates[t] = _lstm_unit_backward(dc, dh, cs[t], acts[t], tanh_cs[t], H)
            if t > 0 or want_h0:
                dh_next = (dgates[t] @ w_hc) * cont[t].reshape(N, 1)
            if self.debug_info:
                self._debug("Backward", f"unit_{t + 1}", f"bottom blob gate_input_{t + 1} diff", dgates[t])
        if self.param_propagate_down[self.rec]:
            self.blobs[self.rec].diff_t.addmm_(dgates.reshape(-1, 4 * H).t(), h_conted.reshape(-1, H))
        self._input_backward(dgates, bottom, propagate_down)
        self._write_state_grads(bottom, (want_h0, want_c0), (dh_next, dc))
        if self.debug_info:
            for i, b in enumerate(self.blobs):
                self._debug("Backward", "params", f"param blob {i} diff", b.diff_t)


@register("RNN")
class RNNLayer(_RecurrentLayer):
    """A simple recurrent net over T steps (Caffe's RNNLayer):

        h_t = tanh(W_hh (cont_t * h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static])
        o_t = tanh(W_ho h_t + b_o)

    Top: o (T x N x H); with expose_hidden also h_T (bottom h_0)."""

    state_names = ("h",)

    def param_specs(self):
        H = self.H
        return self._input_specs("W_xh", "b_h") + [("W_hh", (H, H), "weight"), ("W_ho", (H, H), "weight"),
                                                    ("b_o", (H,), "bias")]

    def forward(self, bottom, top):
        T, N, H = self.T, self.N, self.H
        x = bottom[0].data_t
        wx, ws = self._input_transform(bottom)
        cont = bottom[1].data_t
        (h0,) = self._initial_state(bottom, x)
        w_hh, w_ho, b_o = (b.data_t for b in self.blobs[self.rec:self.rec + 3])
        hs = x.new_empty((T + 1, N, H))
        h_conted = x.new_empty((T, N, H))
        hs[0] = h0
        for t in range(T):
            h_conted[t] = hs[t] * cont[t].reshape(N, 1)
            pre = h_conted[t] @ w_hh.t() + wx[t]
            if ws is not None:
                pre = pre + ws
            hs[t + 1] = torch.tanh(pre)
            if self.debug_info:
                self._debug("Forward", f"h_neuron_{t + 1}", f"top blob h_{t + 1} data", hs[t + 1])
        o = torch.tanh(torch.addmm(b_o, hs[1:].reshape(-1, H), w_ho.t())).reshape(T, N, H)
        if self.debug_info:
            self._debug("Forward", "o_concat", "top blob o data", o)
        self._cache = (cont, hs, h_conted, o)
        top[0].data_t = o.clone()
        if self.expose_hidden:
            top[1].data_t = hs[T].clone().unsqueeze(0)
        else:
            self._carried = [hs[T].clone()]

    def backward(self, top, propagate_down, bottom):
        if not self._needs_backward(propagate_down) or self._cache is None:
            return
        T, N, H = self.T, self.N, self.H
        cont, hs, h_conted, o = self._cache
        r = self.rec
        w_hh, w_ho = self.blobs[r].data_t, self.blobs[r + 1].data_t
        ppd = self.param_propagate_down
        (want_h0,) = self._state_grads_wanted(propagate_down)
        d_o = (top[0].diff_t * (1 - o * o)).reshape(-1, H)
        h_all = hs[1:].reshape(-1, H)
        if ppd[r + 1]:
            self.blobs[r + 1].diff_t.addmm_(d_o.t(), h_all)
        if ppd[r + 2]:
            self.blobs[r + 2].diff_t.add_(d_o.sum(0))
        dh_out = (d_o @ w_ho).reshape(T, N, H)
        dh_next = self._top_state_diff(top, 0)
        d_pre = dh_out.new_empty((T, N, H))
        for t in range(T - 1, -1, -1):
            dh = dh_out[t] if dh_next is None else dh_out[t] + dh_next
            d_pre[t] = dh * (1 - hs[t + 1] * hs[t + 1])
            if t > 0 or want_h0:
                dh_next = (d_pre[t] @ w_hh) * cont[t].reshape(N, 1)
        if ppd[r]:
            self.blobs[r].diff_t.addmm_(d_pre.reshape(-1, H).t(), h_conted.reshape(-1, H))
        self._input_backward(d_pre, bottom, propagate_down)
        self._write_state_grads(bottom, (want_h0,), (dh_next,))
        if self.debug_info:
            for i, b in enumerate(self.blobs):
                self._debug("Backward", "params", f"param blob {i} diff", b.diff_t)
