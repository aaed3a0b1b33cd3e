"""``/v1/recommendations`` (placeholder router; the recommendation routes live here)."""
from fastapi import APIRouter

router = APIRouter()
