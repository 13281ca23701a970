"""The Gradio page: layout and wiring (page.py), the typed chat's and the call's handlers
(chat.py, call_page.py), sessions, settings, the player's messages and the page's own web assets.
No torch: the backend and the voice activity model are given to `page.build_demo`."""
