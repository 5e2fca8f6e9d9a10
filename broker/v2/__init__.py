"""The Comfy API v2 (`/api/v2/…`), per user: jobs, their events, assets."""
