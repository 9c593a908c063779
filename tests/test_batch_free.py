"""Batch-independent tensors that already have the batch's size before they meet
the batch (``wpe(arange(T).repeat(N, 1))``, a table slice repeated N times): row
``j`` of such a tensor meets sample ``j``, and per-sample gradients follow that,
whichever way they are kept (in the parameter's space for lookups and views of
one small parameter, in the tensor's space otherwise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.check import check_model

N, T, D, V = 3, 4, 5, 7


class Positions(nn.Module):
    """Token embedding plus a position term built in one of several ways."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T if how != "big-table" else 64, D)
        self.head = nn.Linear(D, 2)

    def position_term(self, n: int, t: int) -> Tensor:
        if self.how in ("lookup-repeat", "big-table"):
            return self.pos(torch.arange(t).repeat(n, 1))
        if self.how == "slice-repeat":
            return self.pos.weight[:t].repeat(n, 1, 1)
        if self.how == "tanh-repeat":  # not a view of the table: kept per sample of the tensor
            return self.pos(torch.arange(t)).tanh().repeat(n, 1, 1)
        if self.how == "lookup-repeat-interleave":  # rows of dim 0 merged as (N*T, D)
            return self.pos(torch.arange(t).repeat(n)).view(n, t, D)
        raise ValueError(self.how)

    def forward(self, ids: Tensor) -> Tensor:
        n, t = ids.shape
        h = torch.tanh(self.tok(ids) + self.position_term(n, t))
        return self.head(h).sum(1)


HOWS = ["lookup-repeat", "big-table", "slice-repeat", "tanh-repeat", "lookup-repeat-interleave"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_position_term_of_batch_size(how, reduction):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, T))
    y = torch.randint(0, 2, (N,))
    check_model(lambda: Positions(how), lambda m, x, t: F.cross_entropy(m(x), t, reduction=reduction), (ids, y), reduction)
