"""Heads on top of a backbone's global feature."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "GeM", "BNNeckHead", "TEST_FEATURES"]

# The embedding a recognition model gives at test time: its BN-neck output or the feature that enters the neck.
TEST_FEATURES = ("after_neck", "before_neck")


class DINOHead(nn.Module):
    """The DINO projection head (Caron et al. 2021, official `vision_transformer.DINOHead`).

    MLP in_dim -> hidden_dim -> ... -> bottleneck_dim (GELU, optional BN), L2-normalised, then a weight-normalised
    linear layer to `out_dim` prototypes without bias. With `norm_last_layer` the weight-norm magnitude g stays 1
    (not trained), which the paper found stabilises training.

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (B, bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # fp16 underflows at the default eps
        return self.last_layer(F.normalize(x, dim=-1, eps=eps))  # (B, out_dim)


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018): (mean x^p)^(1/p) over space, p learned (init 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C)
        return x.clamp_min(self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


class BNNeckHead(nn.Module):
    """Re-identification head: pool -> optional linear embedding -> BN neck -> classifier.

    From "Bag of Tricks and a Strong Baseline for Deep Person Re-identification" (Luo et al. 2019): the metric losses
    (triplet, centre) see the feature before the BatchNorm, the identity classifier the one after it; the BN bias is
    frozen at 0 and the classifier has no bias. At test time the BN-neck feature is the embedding.

    Pooling of the backbone's `forward_features` output: ViT tokens (B, 1 + N, D) -> "cls" (CLS token) or
    "cls_mean" (CLS concatenated with the mean patch token, 2D; the `prefix_tokens` - 1 register tokens after CLS
    are not patches); ResNet maps (B, C, H, W) -> "avg" or "gem".

    forward(x) in train mode -> {"feat": (B, D) before the neck, "neck": (B, D) after it, "logits": (B, N) or None};
    in eval mode -> (B, D): the neck feature ("after_neck", BoT) or the pooled (embedded) one before it
    ("before_neck": fast-reid / TransReID `TEST.NECK_FEAT: before`, which TransReID-SSL, PASS and SOLIDER-REID test
    with), as `test_feature` says.
    """

    def __init__(self, in_dim: int, num_classes: int, pool: str = "cls", embedding_dim: int = 0,
                 neck: str = "bnneck", classifier: bool = True, prefix_tokens: int = 1,
                 test_feature: str = "after_neck") -> None:  # fmt: skip
        super().__init__()
        if pool not in ("cls", "cls_mean", "avg", "gem"):
            raise ValueError(f"pool {pool!r}: expected cls, cls_mean, avg or gem")
        if test_feature not in TEST_FEATURES:
            raise ValueError(f"test_feature {test_feature!r}: expected one of {', '.join(TEST_FEATURES)}")
        self.test_feature = test_feature
        self.pool_name = pool
        self.prefix_tokens = prefix_tokens  # CLS + register tokens before the patches
        self.gem = GeM() if pool == "gem" else None
        dim = in_dim * 2 if pool == "cls_mean" else in_dim
        self.embedding = nn.Linear(dim, embedding_dim) if embedding_dim else None
        dim = embedding_dim or dim
        self.out_dim = dim
        self.neck = None
        if neck == "bnneck":
            self.neck = nn.BatchNorm1d(dim)
            self.neck.bias.requires_grad = False
        self.classifier = nn.Linear(dim, num_classes, bias=False) if classifier else None
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_name == "cls":
            return x[:, 0]
        if self.pool_name == "cls_mean":
            return torch.cat([x[:, 0], x[:, self.prefix_tokens :].mean(1)], dim=1)
        if self.pool_name == "avg":
            return x.mean((2, 3))
        return self.gem(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None] | torch.Tensor:
        feat = self.pool(x)
        if self.embedding is not None:
            feat = self.embedding(feat)
        if not self.training and self.test_feature == "before_neck":
            return feat  # the BN is not run: its statistics do not matter to this feature
        neck = self.neck(feat) if self.neck is not None else feat
        if not self.training:
            return neck
        logits = self.classifier(neck) if self.classifier is not None else None
        return {"feat": feat, "neck": neck, "logits": logits}
