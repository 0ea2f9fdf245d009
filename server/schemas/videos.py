"""Wire types of /v1/videos (OpenAI's video job protocol), plus LWM's knobs as extras."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lwm_serve.server.schemas.common import OpenAIBaseModel, ResponseModel


class ImageReference(BaseModel):
    """OpenAI's ImageRefParam: exactly one of `image_url` (data URL) or `file_id`."""

    model_config = ConfigDict(extra="forbid")
    image_url: str | None = None
    file_id: str | None = None


class VideoReference(BaseModel):
    """OpenAI's VideoReferenceInputParam; here `id` may also be an uploaded clip's file id."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)


class _DrawKnobs(OpenAIBaseModel):
    """Extras: LWM's knobs by the reference's flag names, the frame count, the seed."""

    model: str | None = None
    prompt: str = Field(min_length=1, max_length=32000)
    seconds: str | None = None
    n_frames: int | None = Field(None, ge=1, description="extra: frames to generate (overrides seconds)")
    seed: int | None = Field(None, ge=0, lt=2**32, description="extra: the draw's random seed")
    key_source: Literal["server", "reference"] = Field(
        "server", description="extra: 'reference' draws with LWM's own key chain for `seed`")
    cfg_scale_image: float | None = None
    temperature_image: float | None = None
    top_k_image: int | None = None
    cfg_scale_video: float | None = None
    temperature_video: float | None = None
    top_k_video: int | None = None


class VideoCreateRequest(_DrawKnobs):
    """OpenAI's CreateVideoJsonBody / CreateVideoMultipartBody (`input_reference` may
    also be an uploaded image part, handled by the route)."""

    size: str | None = None
    input_reference: ImageReference | None = None


class VideoExtendRequest(_DrawKnobs):
    """OpenAI's CreateVideoExtendJsonBody: `video` a completed video's id (or an
    uploaded clip's file id; the multipart form may also carry the clip itself)."""

    video: VideoReference | None = None


class VideoError(ResponseModel):
    code: str
    message: str


class VideoObject(ResponseModel):
    """OpenAI's VideoResource."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: int | None
    expires_at: int | None = None
    prompt: str | None
    size: str
    seconds: str
    remixed_from_video_id: str | None = None
    error: VideoError | None = None


class VideoList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(ResponseModel):
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
    id: str


def nest_form(fields: dict[str, str]) -> dict[str, Any]:
    """Multipart fields as the SDK flattens objects (`video[id]`) back into objects."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if "[" in key and key.endswith("]"):
            outer, inner = key[:-1].split("[", 1)
            node = out.setdefault(outer, {})
            if isinstance(node, dict):
                node[inner] = value
        else:
            out[key] = value
    return out


def body_doc(model: type[BaseModel], file_field: str) -> dict[str, Any]:
    """OpenAPI `requestBody` of a route that reads JSON or multipart itself: the model's
    fields (JSON), the same as form fields plus `file_field` as an upload (multipart)."""
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})

    def inline(node: Any) -> Any:  # the body is documented inline: no $defs to point into
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    props = inline(schema["properties"])
    form = {**props, file_field: {"type": "string", "format": "binary"}}
    required = schema.get("required", [])
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": required, "properties": props}},
        "multipart/form-data": {"schema": {"type": "object", "required": required, "properties": form}}}}}
