"""OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`) over Kiln. (helper: to be written)"""

from fastapi import APIRouter

router = APIRouter(tags=["openai"])
