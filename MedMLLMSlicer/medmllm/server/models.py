"""Pydantic request/response models: validation and the OpenAPI page at /docs.

The same shapes as plain dicts live in `medmllm.protocol` for the client (no pydantic in Slicer).
"""

from __future__ import annotations

from typing import List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medmllm.protocol import API_VERSION

Vec3 = Tuple[float, float, float]


class Strict(BaseModel):
    """Request bodies: NaN and Infinity (which Python's JSON parser accepts) are refused, 422."""

    model_config = ConfigDict(allow_inf_nan=False)


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str = Field(max_length=20000)


class View(Strict):
    orientation: Literal["axial", "coronal", "sagittal"] = "axial"
    index: Optional[int] = Field(None, ge=0, description="IJK index along the slice axis; null = middle")
    window: Optional[Tuple[float, float]] = Field(None, description="(centre, width)")


class RoiBox(Strict):
    center: Vec3 = Field(description="RAS mm")
    size: Vec3 = Field(description="mm along each ROI axis")
    axes: Optional[Tuple[Vec3, Vec3, Vec3]] = Field(
        None, description="3x3 whose columns are the ROI axes in RAS (rows listed); default identity"
    )


class ChatRequest(Strict):
    volume_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    session_id: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    question: Optional[str] = Field(None, min_length=1, max_length=20000)
    messages: Optional[List[Message]] = Field(None, description="replaces the session's conversation")
    view: View = Field(default_factory=View)
    roi: Optional[Union[List[float], RoiBox]] = Field(
        None, description="RAS: 6 numbers r1,a1,s1,r2,a2,s2 (two corners) or {center, size, axes}"
    )
    model: Optional[str] = None
    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)

    @model_validator(mode="after")
    def _one_question(self) -> ChatRequest:
        if not self.question and not self.messages:
            raise ValueError("give a question or messages")
        if self.messages and not self.question and self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's question")
        return self


class Health(BaseModel):
    status: str = "ok"
    server_version: str
    api_version: str = API_VERSION
    engine: str
    auth: bool
    max_volume_bytes: int = Field(description="largest accepted upload (bytes, uncompressed)")


class CapabilitiesOut(BaseModel):
    input: str
    boxes: bool
    masks: bool
    region_input: bool
    streaming: bool
    languages: List[str]


class ModelOut(BaseModel):
    engine: str
    model: str
    description: str
    capabilities: CapabilitiesOut
    licence: str
    intended_use: str


class ModelsOut(BaseModel):
    engine: str
    models: List[ModelOut]


class VolumeOut(BaseModel):
    volume_id: str
    bytes: int
    shape: List[int] = Field(description="[k, j, i]")
    dtype: str


class ResultOut(BaseModel):
    result_id: str
    files: List[str]
