"""Typed settings of the quantize stage (part of `kiln compile`'s config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quantize.fidelity import DEFAULT_MAX_REL_ERROR, DEFAULT_MIN_PSNR
from quantize.int8 import ACTIVATIONS, WEIGHT_BITS


@dataclass
class QuantizeConfig:
    calibration_prompts: int = 8
    """Prompts from the calibration set run through the fp32 pipeline to collect int8 activation ranges
    (1 to 256); every UNet call of every step is one calibration feed."""
    calibration_file: str | None = None
    """A text file of prompts (one per line, `#` comments) instead of Kiln's shipped set."""
    calibration_steps: int | None = None
    """Denoising steps per calibration prompt. None: the bundle's default steps."""
    calibration_size: int | None = None
    """Width and height (pixels, a multiple of 8) of the calibration runs. None: the bundle's default size.
    A smaller size makes calibration faster and its activations smaller (a quarter at half the side); the ranges
    then come from that size's activations, which may differ from those at the serving size."""
    int8_activations: str = "u8"
    """int8 activation type: `u8` (uint8 asymmetric, U8S8: VNNI's native operand order) or `s8` (S8S8)."""
    int8_weight_bits: int = 7
    """Range of the int8 weights that int8 arithmetic multiplies: 7 (codes in [-64, 64]: the same integers on
    every x86 CPU) or 8 (the full [-127, 127]: for CPUs with VNNI or AMX only; on a CPU without them ONNX Runtime
    serves such a bundle through slower exact kernels and OpenVINO refuses it, see `runtime/cpu.py`)."""
    nf4_block_size: int = 64
    """Weights per NF4 absmax block (16, 32, 64, 128 or 256: ONNX Runtime's MatMulBnb4 kernels)."""
    int4_block_size: int = 32
    """Weights per int4 scale block (16 to 256, a power of two)."""
    int4_accuracy_level: int = 4
    """MatMulNBits compute type: 4 quantizes activations to int8 per block (VNNI); 1 computes in fp32."""
    weight_min_elements: int = 4096
    """nf4/int4, and the weight-only int8 of the MatMul/Gemm nodes int8 keeps in fp32 arithmetic: smallest
    weight (K*N) converted; smaller ones stay fp32 (they save little and add error). Every SD v1 linear layer
    is at least 320x320."""
    fidelity_size: int | None = None
    """Width and height (pixels, a multiple of 8) of the fidelity gate's fp32 and quantized runs. None: the
    bundle's default size. A smaller size bounds the gate's time and memory on large models (SDXL's default is
    1024, where one gate runs the UNet at 128x128 latents some twenty times); the gate then judges that size."""
    fidelity_prompts: int = 2
    """Prompts (held out from calibration, one seed each) the gate generates with fp32 and quantized
    components at the bundle's default steps (1 to 64)."""
    min_psnr: float = DEFAULT_MIN_PSNR
    """Lowest allowed mean PSNR (dB) of final images against fp32, per quantized component and overall."""
    max_rel_error: float = DEFAULT_MAX_REL_ERROR
    """Largest allowed relative L2 error of a quantized component's output on the fp32 pipeline's inputs."""
    allow_low_fidelity: bool = False
    """Publish even when the gate fails; the manifest and ListModels then say `low_fidelity`."""

    def __post_init__(self) -> None:
        if not 1 <= self.calibration_prompts <= 256:
            raise ValueError(f"calibration_prompts={self.calibration_prompts} must be between 1 and 256")
        if self.calibration_steps is not None and not 1 <= self.calibration_steps <= 150:
            raise ValueError(f"calibration_steps={self.calibration_steps} must be between 1 and 150")
        if self.calibration_size is not None and not (
                self.calibration_size % 8 == 0 and 8 <= self.calibration_size <= 4096):
            raise ValueError(f"calibration_size={self.calibration_size} must be a multiple of 8 between 8 and 4096")
        if self.fidelity_size is not None and not (self.fidelity_size % 8 == 0 and 8 <= self.fidelity_size <= 4096):
            raise ValueError(f"fidelity_size={self.fidelity_size} must be a multiple of 8 between 8 and 4096")
        if self.int8_activations not in ACTIVATIONS:
            raise ValueError(f"int8_activations={self.int8_activations!r} is not one of: {', '.join(ACTIVATIONS)}")
        if self.int8_weight_bits not in WEIGHT_BITS:
            raise ValueError(f"int8_weight_bits={self.int8_weight_bits!r} is not one of: "
                             f"{', '.join(map(str, WEIGHT_BITS))}")
        if self.nf4_block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"nf4_block_size={self.nf4_block_size} must be one of 16, 32, 64, 128, 256")
        if self.int4_block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"int4_block_size={self.int4_block_size} must be one of 16, 32, 64, 128, 256")
        if self.int4_accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"int4_accuracy_level={self.int4_accuracy_level} must be between 0 and 4")
        if self.weight_min_elements < 0:
            raise ValueError(f"weight_min_elements={self.weight_min_elements} must be 0 or more")
        if not 1 <= self.fidelity_prompts <= 64:
            raise ValueError(f"fidelity_prompts={self.fidelity_prompts} must be between 1 and 64")
        if not 0 < self.min_psnr < 99:
            raise ValueError(f"min_psnr={self.min_psnr} must be between 0 and 99 dB")
        if not 0 < self.max_rel_error <= 10:
            raise ValueError(f"max_rel_error={self.max_rel_error} must be in (0, 10]")

    def graph_fields(self) -> dict[str, object]:
        """The settings that change quantized weights or scales (the gate's thresholds do not)."""
        d = asdict(self)
        return {k: d[k] for k in ("calibration_prompts", "calibration_file", "calibration_steps", "calibration_size",
                                  "int8_activations", "int8_weight_bits",
                                  "nf4_block_size", "int4_block_size", "int4_accuracy_level", "weight_min_elements")}
