"""The AUTOMATIC1111 web UI's API with the ControlNet extension's units, served beside the engine's own
API: `plan` maps a request onto `Runner.generate` calls, `control` the units' images, `img2img` the init
images and masks, `models` the request schemas, `response` the answers, `routes` the HTTP routes.
"""
