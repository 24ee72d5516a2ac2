"""A trained network wrapped as a Predictor: encode -> network -> decode on the patient grid.

Checkpoint file (``torch.save`` of plain data, loaded with ``weights_only=True``)::

    {"format": "atp-dose-cnn", "version": 1, "net": "cadunet", "net_kwargs": {...},
     "encoding": EncodingConfig.to_dict(), "ptv_target": "prescription",
     "ptv_override": True, "decode": "linear", "dose_scale_gy": 70.0,
     "tta": False, "amp": "off", "state_dict": {...}, "meta": {...}}

``ptv_override``: after decoding, every PTV voxel is set to its highest prescription
(the hybrid ATP paper predicts dose only outside the PTV). ``decode``: how the coarse
network output returns to the patient grid (``linear``: trilinear between coarse voxel
centres; ``nearest``: the exact inverse of the encoder's block averaging). ``tta``: the
network output is averaged with that of the left-right mirrored input (paired OAR
channels swapped), mirrored back. ``amp``: ``"bf16"`` runs the network under bfloat16
autocast where the hardware has bf16 (about 1.8x faster on a CPU with AVX-512 BF16; the
output stays float32) and in float32 elsewhere (:func:`bf16_is_fast`); ``"off"`` (the
default, and what older checkpoints get) always in float32.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
from atp.predictor.base import finalize_dose, require_prescriptions, require_trained_organs
from atp.predictor.cascade import CASCADE_FORMAT, CascadePredictor
from atp.predictor.encoding import (
    EncodingConfig,
    decode,
    encode_patient,
    lr_swap_permutation,
    network_inputs,
)
from atp.predictor.nets import build_net

from atp.errors import InputError
from atp.patient import Patient

CHECKPOINT_FORMAT = "atp-dose-cnn"


def bf16_is_fast(device) -> bool:
    """Whether bfloat16 autocast runs natively here: a CUDA device that supports it, or a
    CPU with bf16 instructions (AVX-512 BF16 / AMX, oneDNN). Elsewhere bf16 is emulated and
    tens of times slower than float32, so ``amp="bf16"`` networks run in float32 there (the
    scores agree within 0.001 Gy: BENCHMARKS.md, "Dose prediction")."""
    import torch  # optional heavy dependency (atp[ml])

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's probe
        return False


AMP_MODES = ("off", "bf16")


def _check_amp(amp: str, source=None) -> str:
    if amp not in AMP_MODES:
        raise InputError(f"amp must be 'off' or 'bf16', not {amp!r}", file=source, field="amp")
    return amp


class CNNPredictor:
    """A dose network with its encoding; ``predict(patient)`` -> Gy on the patient grid."""

    def __init__(self, net, encoding: EncodingConfig, *, name: str = "cnn",
                 ptv_target: str = "prescription", ptv_override: bool = True,
                 decode: str = "linear", dose_scale_gy: float = 70.0, net_name: str = "",
                 net_kwargs: dict | None = None, meta: dict | None = None,
                 device: str | None = None, tta: bool = False, amp: str = "off") -> None:
        import torch  # optional heavy dependency (atp[ml])

        self.name = name
        self.net = net
        self.encoding = encoding
        self.ptv_target = ptv_target
        self.ptv_override = bool(ptv_override)
        self.decode = decode
        self.dose_scale_gy = float(dose_scale_gy)
        self.net_name = net_name
        self.net_kwargs = dict(net_kwargs or {})
        self.meta = dict(meta or {})
        self.tta = bool(tta)
        self.amp = _check_amp(amp)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net.to(self.device).eval()

    # --- persistence ----------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": 1, "net": self.net_name,
                "net_kwargs": self.net_kwargs, "encoding": self.encoding.to_dict(),
                "ptv_target": self.ptv_target, "ptv_override": self.ptv_override,
                "decode": self.decode, "dose_scale_gy": self.dose_scale_gy,
                "tta": self.tta, "amp": self.amp,
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "meta": self.meta}

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, name: str | None = None,
                        device: str | None = None) -> CNNPredictor:
        import torch  # optional heavy dependency (atp[ml])

        path = Path(path)
        if not path.is_file():
            raise InputError("network weights not found", file=path)
        try:
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols
                warnings.simplefilter("ignore")
                ck = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InputError("not a checkpoint of plain data (tensors, numbers, text); a "
                             "pickle that could run code is refused", file=path,
                             field="weights") from None
        except (OSError, RuntimeError, ValueError, EOFError,
                zipfile.BadZipFile, AttributeError, KeyError, TypeError,
                ImportError) as exc:  # weights_only refuses anything but plain data
            raise InputError("cannot read network weights (not a torch checkpoint): "
                             + (str(exc).splitlines() or [type(exc).__name__])[0][:200],
                             file=path, field="weights") from None
        if isinstance(ck, dict) and ck.get("format") == CASCADE_FORMAT:
            return cls._cascade_from_dict(ck, name=name, device=device, source=path)
        return cls.from_dict(ck, name=name, device=device, source=path)

    @classmethod
    def _cascade_from_dict(cls, ck: dict, *, name: str | None, device: str | None,
                           source) -> CascadePredictor:
        try:
            s1, s2 = ck["stage1"], ck["stage2"]
        except (KeyError, TypeError):
            raise InputError("cascade checkpoint without stage1 / stage2", file=source,
                             field="format") from None
        return CascadePredictor(cls.from_dict(s1, device=device, source=source),
                                cls.from_dict(s2, device=device, source=source),
                                name=name or "cascade")

    @classmethod
    def from_dict(cls, ck: dict, *, name: str | None = None, device: str | None = None,
                  source=None) -> CNNPredictor:
        """A predictor from a checkpoint's data (see the module doc)."""
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"not an {CHECKPOINT_FORMAT} checkpoint", file=source,
                             field="format")
        try:
            enc = EncodingConfig.from_dict(ck["encoding"])
            kwargs = {k: (tuple(v) if isinstance(v, list) else v)
                      for k, v in ck["net_kwargs"].items()}
            net = build_net(ck["net"], 3, enc.in_channels, 1, **kwargs)
            net.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise InputError(f"inconsistent checkpoint: {exc}", file=source) from None
        amp = _check_amp(ck.get("amp", "off"), source)
        return cls(net, enc, name=name or ck["net"], ptv_target=ck.get("ptv_target",
                   "reference"), ptv_override=ck.get("ptv_override", False),
                   decode=ck.get("decode", "linear"),
                   dose_scale_gy=ck.get("dose_scale_gy", enc.rx_norm_gy), net_name=ck["net"],
                   net_kwargs=ck["net_kwargs"], meta=ck.get("meta", {}), device=device,
                   tta=bool(ck.get("tta", False)), amp=amp)

    # --- prediction -----------------------------------------------------------------
    def predict_network_grid(self, stack: np.ndarray) -> np.ndarray:
        """Network output (dose, Gy) for one encoded channel stack (C, *size).

        With ``tta`` the stack and its left-right mirror go through the network as one
        batch of two; with ``amp == "bf16"`` the network runs under bfloat16 autocast (its
        output in float32)."""
        import torch  # optional heavy dependency (atp[ml])

        stack = np.asarray(stack, dtype=np.float32)
        xs = [network_inputs(stack, self.encoding)]
        if self.tta:  # canonical axis 1 is patient left-right
            flipped = np.flip(stack[lr_swap_permutation(self.encoding)], axis=2)
            xs.append(network_inputs(np.ascontiguousarray(flipped), self.encoding))
        x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).to(self.device)
        with torch.inference_mode():
            if self.amp == "bf16" and bf16_is_fast(self.device):
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    y = self.net(x)
            else:
                y = self.net(x)
            y = y[:, 0].float().cpu().numpy()
        if self.tta:
            y = 0.5 * (y[0] + np.flip(y[1], axis=1))
        else:
            y = y[0]
        return np.ascontiguousarray(y) * self.dose_scale_gy

    def predict(self, patient: Patient) -> np.ndarray:
        require_prescriptions(patient, self.name)
        require_trained_organs(patient, self.name, self.encoding.oars)
        stack, t = encode_patient(patient, self.encoding)
        y = self.predict_network_grid(stack)
        dose = decode(y, t, interpolation=self.decode)
        if self.ptv_override:
            rx = patient.prescription_map_gy()
            dose = np.where(rx > 0, rx, dose)
        return finalize_dose(dose, patient)
