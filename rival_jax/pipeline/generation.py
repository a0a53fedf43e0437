"""Generation: `generate_many` for the variations of several exemplars in one program, `generate` for one.

A mixin of `RivalPipeline` (`pipeline.py` holds the checkpoint, inversion and the reference pass).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from rival_jax.config import RivalConfig
from rival_jax.core import parallel, traces
from rival_jax.core.sampler import GenerationInputs
from rival_jax.errors import RivalError
from rival_jax.pipeline import inputs, programs
from rival_jax.pipeline.control_maps import control_inputs
from rival_jax.pipeline.inputs import OutputType, Request
from rival_jax.pipeline.results import ExemplarGroup, InversionChain, RivalOutput


class Generation:
    """`RivalPipeline`'s generation methods."""

    def generate(
        self,
        chain: InversionChain,
        prompt: str | None = None,
        negative_prompt: str = "",
        num_variations: int | None = None,
        seed: int = 0,
        config: RivalConfig | None = None,
        latents: Any = None,
        mask: Any = None,
        output_type: OutputType = "pil",
        show_progress: bool = False,
        variation_indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        return_traces: bool = False,
    ) -> RivalOutput:
        """Generate `num_variations` images aligned to the exemplar's chain, spread over the local devices.

        Args:
            chain: from `invert`.
            prompt: the generated images' prompt (default: the inversion prompt, i.e. image variation).
            negative_prompt: of the generated images (SDXL: empty = zeros, see `prompts`).
            num_variations: how many images (default: as many as `latents`, else 1; ignored when
                `variation_indices` is given).
            seed: variation i of a seed always starts from fold_in(PRNGKey(seed), i).
            config: the method's settings (`RivalConfig`).
            latents: optional start latents (N, 4, h, w) that replace the initialisation.
            mask: inpainting region (white/True = regenerate): a PIL image at the exemplar's original
                size, or an array at the processed size or the latent size.
            output_type: "pil", "np" or "latent".
            show_progress: step bars on stderr.
            variation_indices: which variations of `seed` to make (default 0..num_variations-1);
                variation i is the same image whatever else is generated with it, on any device count.
            batch_size: pad the batch to at least this many (then to a multiple of the device count),
                so calls with different counts reuse one compiled program; the padding is dropped.
            control_image: with ControlNets loaded, each one's map (a list with several): a path, PIL
                image or uint8 array at the exemplar's size (or its processed size), or "canny" /
                `images.CannyEdges(sigma, low, high)` for the processed exemplar's Canny edges. Instead
                of one map, a ControlNet's entry may be a list of one map per variation (in the order
                of the variations); with one ControlNet, `control_image=[map_0, ..., map_N-1]`.
            controlnet_conditioning_scale, control_guidance_start, control_guidance_end: per
                ControlNet (one value for all, or a list), as in diffusers' ControlNet pipelines.
            return_traces: also return per-step traces in `RivalOutput.traces` (`traces.GenerationTraces`:
                the exemplar's share of attention per layer, the latents' statistic distance to the
                chain). A separate compiled program; the images are the same as without.

        >>> out = pipe.generate(chain, prompt="a watercolor of a lynx", num_variations=4, seed=1)
        """
        inputs.check_output_type(output_type)
        indices = inputs.variation_indices(num_variations, variation_indices, latents)
        control = (controlnet_conditioning_scale, control_guidance_start, control_guidance_end)
        request = Request(indices.tolist(), seed, prompt, negative_prompt, mask, latents, control_image, control)
        options = {"show_progress": show_progress, "return_traces": return_traces}
        return self.generate_many(ExemplarGroup([chain]), [request], config, output_type, batch_size, **options)[0]

    def generate_many(
        self,
        group: ExemplarGroup,
        requests: Sequence[Request],
        config: RivalConfig | None = None,
        output_type: OutputType = "pil",
        batch_size: int | None = None,
        exemplar_count: int | None = None,
        *,
        show_progress: bool = False,
        return_traces: bool = False,
    ) -> list[RivalOutput]:
        """Variations of several exemplars in one program over the local devices; one `RivalOutput` per request.

        Args:
            group: the exemplars' chains (`invert_many`); request k is for chain k.
            requests: one per chain (an empty `variation_indices` generates nothing for that exemplar).
            config: the method's settings, shared by every request (numbers and switches).
            output_type: "pil", "np" or "latent".
            batch_size: pad every exemplar's variations to at least this many (compiled programs are reused).
            exemplar_count: pad the exemplars to at least this many, likewise.
            show_progress: step bars on stderr.
            return_traces: per request, `RivalOutput.traces` (see `generate`).

        In reference mode "keep" the group's features come from one reference pass on its first call;
        each device keeps the features of its own exemplars only ("auto" sizes them per device).
        ControlNets take one exemplar at a time.

        >>> group = ExemplarGroup(pipe.invert_many(["a.jpg", "b.jpg"], ["a cat", "a dog"], 50))
        >>> outs = pipe.generate_many(group, [Request(range(16), seed=0), Request(range(16), seed=1)])
        """
        config, chains = config or RivalConfig(), group.chains
        inputs.check_output_type(output_type)
        if len(requests) != len(chains):
            raise RivalError(f"{len(requests)} requests for {len(chains)} exemplars: give one request per exemplar")
        if self.controlnets and len(chains) > 1:
            raise RivalError("several exemplars in one batch cannot use ControlNets: generate them one at a time")
        kinds = {(c.latents.shape, tuple(c.timesteps), inputs.context_count(c.prompt)) for c in chains}
        if len(kinds) > 1:
            raise RivalError(
                "exemplars generated together must share image size, steps and prompt contexts (inversion prompt "
                "empty or not): group them by these"
            )
        first = requests[0]
        control = control_inputs(
            self.controlnets,
            chains[0],
            self.dtype,
            first.control_image,
            first.control_settings,
            len(first.variation_indices),
        )
        regions = [inputs.mask_region(chain, r.mask) for chain, r in zip(chains, requests, strict=True)]
        starts = [
            np.asarray(
                self.start_latents(chain, np.asarray(r.variation_indices or [0], np.int32), r.seed, config, region)
            )
            if r.latents is None
            else inputs.given_start(chain, r)
            for chain, r, region in zip(chains, requests, regions, strict=True)
        ]
        variations = max(max(len(r.variation_indices) for r in requests), batch_size or 0, 1)
        count = max(len(chains), exemplar_count or 0)
        mesh = parallel.exemplar_mesh(self.mesh, count, variations)
        rows, columns = mesh.devices.shape
        order = parallel.pad_to(np.arange(len(chains)), parallel.padded_length(count, rows))
        kept = group.reference is not None or all(chain.reference is not None for chain in chains)
        mode = self._reference_mode(chains, kept, len(order) // rows)
        reference = self._group_features(group, order, show_progress) if mode == "keep" else None
        length = parallel.padded_length(variations, columns)
        batch = GenerationInputs(
            start=np.stack([parallel.pad_to(starts[k], length) for k in order]),
            chain=jnp.stack([chains[k].latents for k in order]),
            conditioning=inputs.stacked(
                [self.encode_prompt(inputs.generated_prompts(chains[k], requests[k]), chains[k].size) for k in order]
            ),
            contexts=inputs.stacked([self.contexts(chains[k]) for k in order]),
            reference=reference,
            region=np.stack([regions[k] for k in order]),
            settings=config.as_arrays(),
            timesteps=jnp.asarray(chains[0].timesteps),
            control=None if control is None else control.padded(length),
        )
        steps = chains[0].num_inference_steps * self.mesh.size  # every device ticks each step once
        label = "generation (traces)" if return_traces else "generation"
        args = (self.params["unet"], parallel.place(batch, mesh))
        statics = {"mesh": mesh, "return_traces": return_traces}
        donate = GenerationInputs.PER_VARIATION
        final = self._run(label, programs.generation, args, steps, show_progress, donate, **statics)
        traced = None
        if return_traces:
            final, found = final
            shape, contexts = chains[0].latents.shape[1:], self.contexts(chains[0])
            layers = traces.attention_layers(self.models.unet, self.params["unet"], shape, contexts)
            traced = [
                traces.GenerationTraces.from_steps(
                    inputs.entry(found, k), len(r.variation_indices), chains[k].timesteps, layers
                )
                for k, r in enumerate(requests)
            ]
        results = functools.partial(inputs.in_form, output_type=output_type, decode=self.decode)
        return inputs.outputs(requests, np.asarray(final), starts, mode, results, traced)

    def _group_features(self, group: ExemplarGroup, order: np.ndarray, show: bool) -> Any:
        """The group's features stacked in `order`, from one reference pass on first use.

        A chain generated alone keeps its own features (`InversionChain.reference`) for later calls.
        """
        chains = group.chains
        if len(order) == 1:
            if chains[0].reference is None:
                chains[0].reference = inputs.entry(self._reference_many(chains, show), 0)
            return inputs.stacked([chains[0].reference])
        if group.reference is None or group.reference.eps.shape[0] != len(order):
            group.reference = self._reference_many([chains[k] for k in order], show)
        return group.reference
