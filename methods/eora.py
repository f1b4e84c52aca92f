"""EoRA: training-free compensation of a compressed model in the eigenspace of each layer's input activations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from methods.base import Batch, WrapContext
from methods.compress import (CompressedLinear, CompressedLoRA, batch_source, check_compression, compress_weight,
                              score, take_samples)
from methods.lora import LoraInit
from methods.lq_lora import QuantConfig
from tasks.base import model_inputs


def eora_factors(delta: torch.Tensor, cov: torch.Tensor, r: int,
                 eig_floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """B (m×r), A (r×n) with B·A the rank-r minimiser of ‖(ΔW − B·A)·X‖_F for inputs X with X·Xᵀ ∝ C = cov.

    C = QΛQᵀ; the SVD_r of ΔW·QΛ^½ = UΣVᵀ gives B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ Λ^−½ Qᵀ, since
    ‖(ΔW − L)X‖_F² ∝ ‖(ΔW − L)QΛ^½‖_F². Eigenvalues below eig_floor·λ_max (negative ones from rounding, zero ones
    from directions the calibration data never visits) are raised to it so that Λ^−½ stays finite; at full rank
    B·A = ΔW·QΛ^½Λ^−½Qᵀ = ΔW whatever the floor. A zero C (no data) falls back to the plain SVD of ΔW.
    """
    lam, q = torch.linalg.eigh(cov)  # (n,), (n, n) ascending
    top = float(lam.max())
    lam = lam.clamp_min(eig_floor * top) if top > 0 else torch.ones_like(lam)
    root = lam.sqrt()  # (n,)
    u, s, vh = torch.linalg.svd(delta @ (q * root), full_matrices=False)  # (m, k), (k,), (k, n)
    r = min(r, s.numel())
    sr = s[:r].sqrt()  # (r,)
    b = u[:, :r] * sr  # (m, r)
    a = ((sr[:, None] * vh[:r]) / root) @ q.mT  # (r, n)
    return b, a


def weighted_error(d: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """‖D·X‖_F up to the constant √N: √tr(D C Dᵀ)."""
    return torch.einsum("ij,jk,ik->", d, cov, d).clamp_min(0).sqrt()


@torch.no_grad()
def input_covariances(model: nn.Module, layers: dict[str, nn.Module],
                      batches: Sequence[Batch]) -> tuple[dict[str, torch.Tensor], int]:
    """C = (1/N)·Σ x·xᵀ (float64, n×n) over the N input tokens of each layer, padding excluded; and N.

    Forward hooks on the layers read their inputs while the model runs the batches in eval mode. Positions whose
    attention_mask is 0 are dropped when the input is (batch, time, n) and the batch has a mask.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: dict[str, torch.Tensor | None] = {"now": None}

    def hook(name: str):  # noqa: ANN202
        def read(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach()
            m = mask["now"]
            if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
                x = x[m.bool()]  # (N, n) real tokens only
            x = x.reshape(-1, x.shape[-1]).double()  # (N, n)
            sums[name] = sums.get(name, 0) + x.mT @ x  # (n, n)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return read

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask["now"] = batch.get("attention_mask")
            model(**model_inputs(batch))  # an unlearning batch's retain rows are not the model's
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not sums:
        raise ValueError("EoRA saw no calibration tokens; raise method.calibration_samples")
    return {name: sums[name] / max(1, counts[name]) for name in sums}, max(counts.values())


class EoRA(CompressedLoRA):
    """EoRA after LoRA fine-tuning: y = W_c·x + B'·A'·x, W_c = compress(W), B'A' = EoRA_k(W − W_c; C).

    Liu et al., "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation",
    arXiv 2410.21271; reference NVlabs/EoRA @ 11ff6c0e1c90862945c9fd524c07637be2fbbb12 (EoRA/eora.py
    `llama_sequential_eigen`).

    Training is LoRA's (PEFT; every key of conf/method/lora.yaml). post_train(), in this harness:
    1. W = W0 + ΔW_LoRA for every target layer: the fine-tuned model ("base/<metric>", scored with ctx.evaluate).
    2. C = E[x·xᵀ] of each target layer's input on `calibration_samples` training examples of the fine-tuned model
       (forward hooks, padding tokens excluded), from ctx.train_batches() (or the batches calibrate() saw).
    3. W_c = compress(W): `compression` applied in order, `magnitude` (the smallest |w| to `sparsity`), `2:4`
       (the 2 largest |w| of every 4 consecutive inputs), `nf4` (lq_lora's blockwise NormalFloat-4 with double-
       quantised scales); the layer scores as "compressed/<metric>".
    4. ΔW = W − W_c; C = QΛQᵀ; SVD_k(ΔW·QΛ^½) = UΣVᵀ; B' = UΣ^½, A' = Σ^½VᵀΛ^−½Qᵀ (`eora_factors`, k = `eora_rank`
       capped at min(m, n)). Eigenvalues are floored at `eig_floor`·λ_max (the reference replaces negative ones by
       the smallest positive one); the floor keeps Λ^−½ finite where the calibration tokens span fewer than n
       directions, and changes nothing at full rank.
    The runner's final evaluation then scores the compensated model. Each target becomes a `CompressedLinear`
    (frozen W_c, the factors B', A' as its trainable low-rank adapter, as the paper's optional LoRA initialisation:
    they are what adapter.safetensors saves); merge() writes W_c + B'A', delta_weights() = W_c + B'A' − W0. The
    record's params.trainable counts the LoRA that training updated (the runner counts before post_train);
    "eora/compensation_params" counts B', A'.

    Where this differs from the reference: compression is magnitude/2:4 pruning and NF4 round-to-nearest
    quantisation (the reference uses GPTQ, SparseGPT and Wanda, which are data-aware); the covariance of every layer
    comes from one pass of the fine-tuned, uncompressed model (the reference goes block by block, each block's inputs
    coming from the already compressed and compensated blocks before it); the compensation is fp32 (no quantisation
    of B', A'); a "sample" is one training example (the reference: a 2048-token sequence). Every target layer's C is
    held at once, in float64 on the model's device (n²·8 bytes each: small for the benchmark's models, not for a 7B).

    Args (beyond LoRA's):
        compression: steps applied in order: [magnitude], [2:4], [nf4], or a pruning then nf4 ([2:4, nf4]).
        sparsity: fraction of weights `magnitude` zeroes in every matrix.
        quant_block_size, quant_scale_block_size: NF4's absmax block and scale block sizes (QLoRA: 64, 256).
        eora_rank: k, the rank of the compensation (the paper's default 128), capped at min(m, n).
        calibration_samples: training examples whose activations estimate C (the paper: 64).
        eig_floor: eigenvalues of C below eig_floor·λ_max are raised to it.
    """

    def __init__(
        self,
        lr: float,
        target_modules: Sequence[str] = ("query", "key", "value", "dense"),
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        init: LoraInit = "default",
        use_dora: bool = False,
        use_rslora: bool = False,
        compression: Sequence[str] = ("2:4",),
        sparsity: float = 0.5,
        quant_block_size: int = 64,
        quant_scale_block_size: int = 256,
        eora_rank: int = 128,
        calibration_samples: int = 64,
        eig_floor: float = 1e-6,
    ) -> None:
        super().__init__(lr=lr, target_modules=target_modules, r=r, alpha=alpha, dropout=dropout, init=init,
                         use_dora=use_dora, use_rslora=use_rslora)
        self.compression = check_compression(compression, sparsity)
        if eora_rank < 1 or calibration_samples < 1:
            raise ValueError(f"method.eora_rank and method.calibration_samples must be >= 1, "
                             f"got {eora_rank}, {calibration_samples}")
        if not 0.0 <= eig_floor < 1.0:
            raise ValueError(f"method.eig_floor must be in [0, 1), got {eig_floor}")
        self.sparsity, self.eora_rank = float(sparsity), int(eora_rank)
        self.calibration_samples, self.eig_floor = int(calibration_samples), float(eig_floor)
        self.qconfig = QuantConfig(bits=4, block_size=quant_block_size, scale_block_size=quant_scale_block_size)

    def post_train(self, model: nn.Module, ctx: WrapContext) -> dict[str, float]:
        metric = ctx.main_metric or "score"
        out: dict[str, float] = {}
        base_score = score(ctx, model)
        layers = self.lora_layers(model)
        weights = self.fine_tuned_weights(model)  # (m, n) float64 each
        samples = take_samples(batch_source(ctx, self._calibration)(), self.calibration_samples)
        cov, tokens = input_covariances(model, layers, samples)

        compressed: dict[str, torch.Tensor] = {}
        modules: list[CompressedLinear] = []
        err_c, err_e, ranks = [], [], []
        for name, layer in layers.items():
            base = layer.get_base_layer()
            dtype = base.weight.dtype
            w_c = compress_weight(weights[name], self.compression, self.sparsity, self.qconfig).to(dtype)  # (m, n)
            compressed[name] = w_c
            delta = weights[name] - w_c.double()  # (m, n)
            b, a = eora_factors(delta, cov[name], self.eora_rank, self.eig_floor)  # (m, k), (k, n)
            scale = weighted_error(weights[name], cov[name]).clamp_min(1e-30)
            err_c.append(float(weighted_error(delta, cov[name]) / scale))
            err_e.append(float(weighted_error(delta - b @ a, cov[name]) / scale))
            ranks.append(b.shape[1])
            module = CompressedLinear(w_c, base.bias, b.to(dtype), a.to(dtype), trainable=True)
            module.compensate = False  # scored as the compressed model first
            self.install(model, name, module)
            modules.append(module)
        self.compressed = True
        compressed_score = score(ctx, model)
        for module in modules:
            module.compensate = True

        if base_score is not None:
            out[f"base/{metric}"] = base_score
            out[f"compressed/{metric}"] = compressed_score  # type: ignore[assignment]
        out.update(self.compression_stats(weights, compressed))
        out.update({
            "eora/rank": float(sum(ranks) / len(ranks)),
            "eora/compensation_params": float(sum(m.stored_parameters() - m.weight.numel() for m in modules)),  # B', A'
            "eora/calibration_tokens": float(tokens),
            "eora/output_error_compressed": sum(err_c) / len(err_c),  # mean ‖(W − W_c)X‖ / ‖WX‖
            "eora/output_error_compensated": sum(err_e) / len(err_e),  # mean ‖(W − W_c − B'A')X‖ / ‖WX‖
        })
        return out
