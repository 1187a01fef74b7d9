"""One micro-batch to a per-sample loss: latents, noise, timesteps, text, UNet; the maths as pure functions."""
