"""FLAP (An et al., AAAI 2024), the authors' own pruning code, for a peer row on our benchmark.

Copied from github.com/CASIA-IVA-Lab/FLAP, commit 3bb57db3449dd2fa04a5c2192de80e87e33be2b1 (2024-01-06):
  lib/prune.py        metrics, find_layers, prepare_calibration_input, compress, cal_remove_neuron, prune_flap
  lib/layerwrapper.py BiasGPT
  main.py             get_llm's zero biases on o_proj / down_proj and model.seqlen, reproduced in run_flap
Their numerics are kept. Every changed line ends with a marker:
  # CHANGED(cpu):  .cuda()/.cpu() round trips and torch.cuda.empty_cache() dropped (device is 'cpu')
  # CHANGED(tf5):  transformers 5.x (LlamaAttention has no num_heads; the decoder layer needs position_embeddings)
  # CHANGED(hd):   the head size 128 hard-coded for LLaMA-7B..65B read from the model (head_dim)
  # CHANGED(glue): calibration windows given as a tensor, not wikitext2 through a tokenizer; GQA guards
Not marked: long lines re-wrapped to <= 120 columns, prints and the tqdm bar dropped, and
prune_wanda_sp / prune_magnitude_sp / check_sparsity / WrappedGPT (other methods) not copied.

Under grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads) FLAP's head pruning cannot run as
written (it cuts the same rows out of q_proj, k_proj and v_proj), so only configurations that remove no head
run there: "UL-MM" with remove_heads=0 (uniform MLP channels, the count from cal_remove_neuron), "UL-UM" with
int(pruning_ratio * num_heads) == 0, and "AL-MM" with remove_heads=0 (adaptive MLP channels; needs the one
marked fix below, as the authors' sorted_attn[-0] would remove every head). "AL-AM" ranks heads against
channels and always removes heads: refused under GQA. On a model with as many key/value heads as query heads
every structure runs.
"""

from types import SimpleNamespace

import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------------------------
# lib/layerwrapper.py, BiasGPT (verbatim but for the marked line)
# ---------------------------------------------------------------------------------------------------------


# Define BiasGPT class
class BiasGPT:
    """
    This class wraps a GPT layer for specific operations.
    """
    def __init__(self, layer, metric):
        self.layer = layer
        self.dev = self.layer.weight.device
        self.out_dim = layer.weight.data.shape[0]
        self.in_dim = layer.weight.data.shape[1]
        self.type = metric
        self.nsamples = 0

        self.baseline_inp = torch.zeros((self.in_dim), device=self.dev)
        if self.type == "WIFN":
            self.scaler_inp = torch.zeros((self.in_dim), device=self.dev)
        else:
            self.fluc_inp = torch.zeros((self.in_dim), device=self.dev)

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        batch_size = inp.shape[0]
        if isinstance(self.layer, nn.Linear):
            if len(inp.shape) == 3:
                inp = inp.reshape((-1, inp.shape[-1]))
            inp = inp.t()   # (dim, seqlen)

        old_baseline_inp = self.baseline_inp
        self.baseline_inp *= self.nsamples / (self.nsamples + batch_size)
        self.baseline_inp += torch.mean(inp, dim=1) / (self.nsamples + batch_size)
        if self.type == "WIFN":
            inp = inp.type(torch.float32)
            self.scaler_inp *= self.nsamples / (self.nsamples + batch_size)
            self.scaler_inp += torch.norm(inp, p=2, dim=1) ** 2  / (self.nsamples + batch_size)
        else:
            if self.nsamples == 0:
                self.fluc_inp = 0
            else:
                self.fluc_inp *= (self.nsamples - 1) / (self.nsamples + batch_size - 1)
                self.fluc_inp += torch.sum(
                    (inp - self.baseline_inp.unsqueeze(1)) * (inp - old_baseline_inp.unsqueeze(1)), dim=1
                ) / (self.nsamples + batch_size)   # a²+b²+c²...没开根号

        self.nsamples += batch_size

    def free(self):
        self.baseline_inp = None
        if hasattr(self, 'fluc_inp'):
            self.fluc_inp = None
        if hasattr(self, 'scaler_inp'):
            self.scaler_inp = None
        # torch.cuda.empty_cache()  # CHANGED(cpu)


# ---------------------------------------------------------------------------------------------------------
# lib/prune.py
# ---------------------------------------------------------------------------------------------------------

# create a dictionary to map the method name to the function
"""
    'IFV': Input Feature Variance
    'WIFV': Weighted Input Feature Variance
    'WIFN': Weighted Input Feature Norm
"""
metrics = {
    'IFV': lambda wrapped_layers, subset, name: wrapped_layers[name].fluc_inp,
    'WIFV': lambda wrapped_layers, subset, name: wrapped_layers[name].fluc_inp
    * torch.sum(subset[name].weight.data.pow(2), dim=0),
    'WIFN': lambda wrapped_layers, subset, name: (torch.abs(subset[name].weight.data)
                                                  * torch.sqrt(wrapped_layers[name].scaler_inp.reshape((1, -1))))
    .mean(axis=0),
}


def find_layers(module, layers=[nn.Linear], name=''):
    """
    Recursively find the layers of a certain type in a module.

    Args:
        module (nn.Module): PyTorch module.
        layers (list): List of layer types to find.
        name (str): Name of the module.

    Returns:
        dict: Dictionary of layers of the given type(s) within the module.
    """
    if type(module) in layers:
        return {name: module}
    res = {}
    for name1, child in module.named_children():
        res.update(find_layers(
            child, layers=layers, name=name + '.' + name1 if name != '' else name1
        ))
    return res


def prepare_calibration_input(model, dataloader, device):
    """
    Prepare inputs for model calibration.

    Args:
        model (nn.Module): The model to prepare inputs for.
        dataloader (DataLoader): DataLoader object to fetch input data.
        device (torch.device): Device on which the model is loaded.

    Returns:
        inps (torch.Tensor): Input tensor for calibration.
        outs (torch.Tensor): Output tensor for calibration.
        attention_mask (torch.Tensor): Attention mask tensor.
        position_ids (torch.Tensor): Position IDs tensor.
    """
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers

    if "model.embed_tokens" in getattr(model, 'hf_device_map', {}):
        device = model.hf_device_map["model.embed_tokens"]

    dtype = next(iter(model.parameters())).dtype
    inps = torch.zeros((len(dataloader), model.seqlen, model.config.hidden_size), dtype=dtype,  # CHANGED(glue)
                       device=device)  # (their 2048 rows: the most samples main.py takes; here the window count)
    inps.requires_grad = False
    cache = {'i': 0, 'attention_mask': None, "position_ids": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache['i']] = inp
            cache['i'] += 1
            cache['attention_mask'] = kwargs['attention_mask']
            cache['position_ids'] = kwargs['position_ids']
            cache['position_embeddings'] = kwargs['position_embeddings']  # CHANGED(tf5): rotary (cos, sin)
            raise ValueError

    layers[0] = Catcher(layers[0])
    for batch in dataloader:
        try:
            model(batch[0].to(device))
        except ValueError:
            pass
    layers[0] = layers[0].module

    outs = torch.zeros_like(inps)
    attention_mask = cache['attention_mask']
    position_ids = cache['position_ids']
    model.config.use_cache = use_cache

    return inps, outs, attention_mask, position_ids, cache['position_embeddings']  # CHANGED(tf5)


def compress(layer, attn_mask, mlp_mask, attn_mean_inp, mlp_mean_inp, device, bias=True, unstr=False):
    """
    Compress a model layer by masking or pruning based on the given masks.

    Args:
        layer (nn.Module): The model layer to compress.
        attn_mask (torch.Tensor): The mask to apply to the attention weights.
        mlp_mask (torch.Tensor): The mask to apply to the MLP weights.
        attn_mean_inp (torch.Tensor): The mean attention input.
        mlp_mean_inp (torch.Tensor): The mean MLP input.
        device (torch.device): Device on which the model is loaded.
        bias (bool, optional): Whether to consider bias while compressing. Defaults to True.
        unstr (bool, optional): If True, only mask without real pruning. Defaults to False.

    Returns:
        None: This function modifies the layer in-place and doesn't return anything.
    """
    # CHANGED(glue): every head kept -> the authors' step is the identity (same weights, o_proj bias set to
    # (mean * 0) @ W.T = 0), and under GQA its q/k/v indexing would fail; so skip it. Heads removed under GQA:
    if attn_mask is not None and bool(attn_mask.all()):  # CHANGED(glue)
        attn_mask = None  # CHANGED(glue)
    if attn_mask is not None and layer.self_attn.num_key_value_groups != 1:  # CHANGED(glue)
        raise NotImplementedError("FLAP removes the same rows from q/k/v: no heads under grouped-query attention")
    head_dim = layer.self_attn.head_dim  # CHANGED(hd)
    if unstr:  # Only mask, do not really prune
        # Attention Weight Masking
        if attn_mask is not None:
            retain_heads = torch.count_nonzero(attn_mask)
            attn_mask = attn_mask.repeat_interleave(head_dim)  # CHANGED(hd)
            # Apply the mask to the query, key and value projection weights
            layer.self_attn.q_proj.weight.data *= attn_mask.unsqueeze(-1).to(device)
            layer.self_attn.k_proj.weight.data *= attn_mask.unsqueeze(-1).to(device)
            layer.self_attn.v_proj.weight.data *= attn_mask.unsqueeze(-1).to(device)

            output_weight = layer.self_attn.o_proj.weight.data
            if bias:
                # Add the additional bias to compensate for the loss
                output_bias = ((attn_mean_inp * ~attn_mask.to(device)) @ output_weight.T)

            # Note: the weight data is masked, but the weight tensor shape remains unchanged
            if bias:
                layer.self_attn.o_proj.bias.data = output_bias
            layer.self_attn.o_proj.weight.data = output_weight

        # MLP Weight Masking
        if mlp_mask is not None:
            # Apply the mask to the up and gate projection weights
            layer.mlp.up_proj.weight.data *= mlp_mask.unsqueeze(-1).to(device)
            layer.mlp.gate_proj.weight.data *= mlp_mask.unsqueeze(-1).to(device)

            output_weight = layer.mlp.down_proj.weight.data
            if bias:
                # Add the additional bias to compensate for the loss
                output_bias = ((mlp_mean_inp * ~mlp_mask.to(device)) @ output_weight.T)

            # Note: the weight data is masked, but the weight tensor shape remains unchanged
            if bias:
                layer.mlp.down_proj.bias.data = output_bias
            layer.mlp.down_proj.weight.data = output_weight

    else:
        # Real Pruning
        # Attention Weight Pruning
        if attn_mask is not None:
            retain_heads = torch.count_nonzero(attn_mask)
            attn_mask = attn_mask.repeat_interleave(head_dim)  # CHANGED(hd)

            # Prune the query, key and value projection weights
            # We reduce the size of the weights based on the attention mask
            layer.self_attn.q_proj.weight.data = layer.self_attn.q_proj.weight.data[torch.where(attn_mask)[0]]
            layer.self_attn.k_proj.weight.data = layer.self_attn.k_proj.weight.data[torch.where(attn_mask)[0]]
            layer.self_attn.v_proj.weight.data = layer.self_attn.v_proj.weight.data[torch.where(attn_mask)[0]]

            # Update output dimensions of q, k, v projections based on remaining heads
            layer.self_attn.q_proj.out_features = attn_mask.sum().item()
            layer.self_attn.k_proj.out_features = attn_mask.sum().item()
            layer.self_attn.v_proj.out_features = attn_mask.sum().item()

            output_weight = layer.self_attn.o_proj.weight.data

            if bias:
                # Add the additional bias to compensate for the loss
                output_bias = ((attn_mean_inp * ~attn_mask.to(device)) @ output_weight.T)

            # Prune the output projection weight
            output_weight = layer.self_attn.o_proj.weight.data[:, torch.where(attn_mask)[0]]
            # Update layer configurations for the new output shape after pruning
            # (transformers 5.x reads neither: its attention reshapes with -1 heads)
            layer.self_attn.num_heads = retain_heads
            layer.self_attn.hidden_size = retain_heads * head_dim  # CHANGED(hd)

            if bias:
                # Re-initialize the Linear layer with new shape and bias
                layer.self_attn.o_proj.in_features = attn_mask.sum().item()
                layer.self_attn.o_proj.bias.data = output_bias

            # Assign the pruned weights
            layer.self_attn.o_proj.weight.data = output_weight

        # MLP Weight Pruning
        if mlp_mask is not None:
            # Prune the up and gate projection weights
            layer.mlp.up_proj.weight.data = layer.mlp.up_proj.weight.data[torch.where(mlp_mask)[0]]
            layer.mlp.gate_proj.weight.data = layer.mlp.gate_proj.weight.data[torch.where(mlp_mask)[0]]

            # Update output dimensions of up and gate projections based on the mlp mask
            layer.mlp.up_proj.out_features = mlp_mask.sum().item()
            layer.mlp.gate_proj.out_features = mlp_mask.sum().item()

            output_weight = layer.mlp.down_proj.weight.data
            layer.mlp.intermediate_size = mlp_mask.sum().item()
            if bias:
                # Add the additional bias to compensate for the loss
                output_bias = ((mlp_mean_inp * ~mlp_mask.to(device)) @ output_weight.T)

            # Prune the down projection weight
            output_weight = layer.mlp.down_proj.weight.data[:, torch.where(mlp_mask)[0]]

            if bias:
                # Re-initialize the Linear layer with new shape and bias
                layer.mlp.down_proj.in_features = mlp_mask.sum().item()
                layer.mlp.down_proj.bias.data = output_bias

            # Assign the pruned weights
            layer.mlp.down_proj.weight.data = output_weight

    # Explicitly empty the CUDA cache to clean up some memory
    # torch.cuda.empty_cache()  # CHANGED(cpu)


def cal_remove_neuron(args, model):
    intermediate_size = model.config.intermediate_size
    hidden_size = model.config.hidden_size
    num_layers = model.config.num_hidden_layers
    head_dim = model.model.layers[0].self_attn.head_dim  # CHANGED(hd)
    if args.structure == "UL-MM":
        remove_params = args.pruning_ratio * (intermediate_size * hidden_size * 3 + hidden_size * hidden_size * 4)
        remove_head_params = hidden_size * 4 * (args.remove_heads // num_layers) * head_dim  # CHANGED(hd)
        return int((remove_params - remove_head_params) / (hidden_size * 3))
    else:
        remove_params = num_layers * args.pruning_ratio * (intermediate_size * hidden_size * 3
                                                           + hidden_size * hidden_size * 4)
        remove_head_params = hidden_size * 4 * args.remove_heads * head_dim  # CHANGED(hd)
        return int((remove_params - remove_head_params) / (hidden_size * 3))


def prune_flap(args, model, calib, device=torch.device("cpu")):  # CHANGED(glue)+(cpu): calib, not tokenizer
    """
    Our FLAP Pruning.

    Args:
        args (object): Command line arguments parsed via argparse.
        model (nn.Module): PyTorch model to prune.
        calib (LongTensor): (nsamples, seqlen) calibration token ids.  # CHANGED(glue)
        device (torch.device, optional): Device to move tensors to.  # CHANGED(cpu)
    """
    use_cache = model.config.use_cache
    model.config.use_cache = False

    dataloader = [(calib[k:k + 1], None) for k in range(calib.shape[0])]  # CHANGED(glue): get_loaders' format

    with torch.no_grad():
        inps, outs, attention_mask, position_ids, position_embeddings = prepare_calibration_input(  # CHANGED(tf5)
            model, dataloader, device)
    layers = model.model.layers
    num_heads = model.config.num_attention_heads  # CHANGED(tf5): LlamaAttention has no num_heads in 5.x
    head_dim = layers[0].self_attn.head_dim  # CHANGED(hd)

    attn_metric_list, mlp_metric_list = [], []
    attn_baseline_inp_list, mlp_baseline_inp_list = [], []
    attn_mask, mlp_mask = [], []

    # Split into sub-problems, separate statistics for each module
    for i in range(len(layers)):
        layer = layers[i]
        subset = {}
        subset.update({'self_attn.o_proj': find_layers(layer)['self_attn.o_proj']})
        subset.update({'mlp.down_proj': find_layers(layer)['mlp.down_proj']})

        # handle the case for llama-30B and llama-65B, when the device map has multiple GPUs;
        if f"model.layers.{i}" in getattr(model, 'hf_device_map', {}):
            dev = model.hf_device_map[f"model.layers.{i}"]
            inps, outs, attention_mask, position_ids = inps.to(dev), outs.to(dev), attention_mask.to(dev), \
                position_ids.to(dev)

        wrapped_layers = {}
        for name in subset:
            wrapped_layers[name] = BiasGPT(subset[name], args.metrics)

        def add_batch(name):
            def tmp(_, inp, out):
                wrapped_layers[name].add_batch(inp[0].data, out.data)
            return tmp

        handles = []
        for name in wrapped_layers:
            handles.append(subset[name].register_forward_hook(add_batch(name)))
        for j in range(args.nsamples):
            with torch.no_grad():
                outs[j] = layer(inps[j].unsqueeze(0), attention_mask=attention_mask, position_ids=position_ids,
                                position_embeddings=position_embeddings)[0]  # CHANGED(tf5)
        for h in handles:
            h.remove()

        for name in subset:
            if name == 'self_attn.o_proj':
                W_metric = metrics[args.metrics](wrapped_layers, subset, name) ** 2
                if args.structure == "UL-UM":
                    W_metric = W_metric.reshape(-1, head_dim).sum(dim=1)  # CHANGED(hd)
                    thresh = torch.sort(W_metric)[0][int(args.pruning_ratio * num_heads)]  # CHANGED(cpu)+(tf5)
                    W_mask = (W_metric >= thresh)
                    attn_mask.append(W_mask)
                elif args.structure == "UL-MM":
                    W_metric = W_metric.reshape(-1, head_dim).sum(dim=1)  # CHANGED(hd)
                    thresh = torch.sort(W_metric)[0][args.remove_heads // len(layers)]  # CHANGED(cpu)
                    W_mask = (W_metric >= thresh)
                    attn_mask.append(W_mask)
                else:
                    attn_metric_list.append(W_metric.cpu())
                # CHANGED(glue): .type(torch.half) was their fp16 model's dtype; ours is the weights' dtype
                attn_baseline_inp_list.append(wrapped_layers[name].baseline_inp.type(subset[name].weight.dtype))
            else:
                W_metric = metrics[args.metrics](wrapped_layers, subset, name)
                if args.structure == "UL-UM":
                    thresh = torch.sort(W_metric)[0][int(W_metric.numel() * args.pruning_ratio)]  # CHANGED(cpu)
                    W_mask = (W_metric >= thresh)
                    mlp_mask.append(W_mask)
                elif args.structure == "UL-MM":
                    thresh = torch.sort(W_metric)[0][cal_remove_neuron(args, model)]  # CHANGED(cpu)
                    W_mask = (W_metric >= thresh)
                    mlp_mask.append(W_mask)
                else:
                    mlp_metric_list.append(W_metric.cpu())
                # CHANGED(glue): .type(torch.half) was their fp16 model's dtype; ours is the weights' dtype
                mlp_baseline_inp_list.append(wrapped_layers[name].baseline_inp.type(subset[name].weight.dtype))
            wrapped_layers[name].free()

        inps, outs = outs, inps  # Use the original output as input to the next layer
        # torch.cuda.empty_cache()  # CHANGED(cpu)

    standarlization = lambda x: (x - torch.mean(x, axis=1, keepdim=True)) / torch.std(x, axis=1, keepdim=True)  # noqa

    if args.structure in ["AL-MM", "AL-AM"]:
        attn_metric = torch.stack(attn_metric_list)
        attn_metric = standarlization(attn_metric)
        attn_metric = attn_metric.reshape(len(layers), -1, head_dim).mean(dim=2)  # CHANGED(hd)

        mlp_metric = torch.stack(mlp_metric_list)
        mlp_metric = standarlization(mlp_metric)

        if args.structure == "AL-MM":
            sorted_attn = torch.sort(attn_metric.view(-1), descending=True)[0]
            if args.remove_heads > 0:  # CHANGED(glue): sorted_attn[-0] is the largest: every head would go
                attn_thres = sorted_attn[-int(args.remove_heads)]
                attn_mask = (attn_metric > attn_thres)  # 1 means retain
            else:  # CHANGED(glue)
                attn_mask = torch.ones_like(attn_metric, dtype=torch.bool)  # CHANGED(glue): no head removed

            sorted_mlp = torch.sort(mlp_metric.view(-1), descending=True)[0]
            mlp_thres = sorted_mlp[-cal_remove_neuron(args, model)]
            mlp_mask = (mlp_metric > mlp_thres)
        else:
            prune_metric = torch.cat([attn_metric.view(-1), mlp_metric.view(-1)])
            sorted_prune, indices = torch.sort(prune_metric, descending=True)
            compression_weight = torch.ones_like(indices)
            # 512/3 = a head's parameters (4 * hidden * 128) over a channel's (3 * hidden)
            compression_weight[indices < attn_metric.numel()] = 4.0 * head_dim / 3  # CHANGED(hd): was 512.0 / 3
            threshold = sorted_prune[torch.argmin(torch.abs(
                torch.cumsum(compression_weight, 0) - torch.sum(compression_weight) * (1 - args.pruning_ratio)))]
            attn_mask = (attn_metric > threshold)
            mlp_mask = (mlp_metric > threshold)
    else:
        attn_mask = torch.stack(attn_mask)
        mlp_mask = torch.stack(mlp_mask)

    for idx in range(len(layers)):
        if f"model.layers.{i}" in getattr(model, 'hf_device_map', {}):
            compress(model.model.layers[idx], attn_mask[idx], None, attn_baseline_inp_list[idx], None,
                     model.hf_device_map[f"model.layers.{idx}"], unstr=args.unstr)
        else:
            compress(model.model.layers[idx], attn_mask[idx], None, attn_baseline_inp_list[idx], None, device,
                     unstr=args.unstr)

        if f"model.layers.{i}" in getattr(model, 'hf_device_map', {}):
            compress(model.model.layers[idx], None, mlp_mask[idx], None, mlp_baseline_inp_list[idx],
                     model.hf_device_map[f"model.layers.{idx}"], unstr=args.unstr)
        else:
            compress(model.model.layers[idx], None, mlp_mask[idx], None, mlp_baseline_inp_list[idx], device,
                     unstr=args.unstr)

    model.config.use_cache = use_cache
    # torch.cuda.empty_cache()  # CHANGED(cpu)


# ---------------------------------------------------------------------------------------------------------
# Our entry point: main.py's get_llm + prune_flap, for a loaded transformers LlamaForCausalLM (ours, not theirs)
# ---------------------------------------------------------------------------------------------------------


def _removes_heads(cfg, structure, pruning_ratio, remove_heads):
    """Whether FLAP's selection, as written, can remove a head in this configuration."""
    if structure == "UL-UM":
        return int(pruning_ratio * cfg.num_attention_heads) > 0
    if structure == "UL-MM":
        return remove_heads // cfg.num_hidden_layers != 0   # -1 // L == -1: sorted[-1], one head kept
    if structure == "AL-MM":
        return remove_heads != 0
    return True  # AL-AM ranks heads with channels


def run_flap(model, calib, *, pruning_ratio, structure="UL-UM", metrics="WIFV", remove_heads=0, unstr=False):
    """Prune ``model`` (a transformers LlamaForCausalLM, eval) in place as FLAP's main.py does with
    ``--prune_method flap --pruning_ratio P --structure S --metrics M --remove_heads R --nsamples N``
    (N = calib rows, model.seqlen = calib columns), bias compensation included. Returns what it kept."""
    if structure not in ("UL-UM", "UL-MM", "AL-MM", "AL-AM") or metrics not in ("IFV", "WIFV", "WIFN"):
        raise ValueError(f"FLAP structure {structure!r} / metrics {metrics!r}")
    cfg = model.config
    if cfg.num_key_value_heads != cfg.num_attention_heads and _removes_heads(cfg, structure, pruning_ratio,
                                                                             remove_heads):
        raise NotImplementedError(
            f"FLAP {structure} (pruning_ratio={pruning_ratio}, remove_heads={remove_heads}) removes attention heads, "
            "which its code cannot do under grouped-query attention; use UL-MM or AL-MM with remove_heads=0")
    if getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise NotImplementedError("FLAP's compress overwrites the output bias: their LLaMA has none of its own")
    layers = model.model.layers
    before = sum(p.numel() for p in layers.parameters())
    # main.py get_llm: a zero bias on every o_proj and down_proj (their modeling_llama has bias=True there)
    for layer in layers:
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    args = SimpleNamespace(pruning_ratio=pruning_ratio, structure=structure, metrics=metrics,
                           remove_heads=remove_heads, nsamples=calib.shape[0], unstr=unstr)
    device = next(model.parameters()).device
    model.seqlen = calib.shape[1]
    try:
        prune_flap(args, model, calib.to(device), device)
    finally:
        del model.seqlen
    # the zero o_proj biases left where no head went change nothing: dropped, so the row counts no extra parameters
    for layer in layers:
        o = layer.self_attn.o_proj
        if o.in_features == cfg.num_attention_heads * layer.self_attn.head_dim and not o.bias.any():
            o.bias = None
    after = sum(p.numel() for p in layers.parameters())
    return {
        "method": "FLAP", "repo": "CASIA-IVA-Lab/FLAP@3bb57db", "structure": structure, "metrics": metrics,
        "pruning_ratio": pruning_ratio, "remove_heads": remove_heads, "nsamples": args.nsamples,
        "seqlen": calib.shape[1], "unstr": unstr,
        "mlp_kept": [layer.mlp.down_proj.in_features for layer in layers],
        "heads_kept": [layer.self_attn.o_proj.in_features // layer.self_attn.head_dim for layer in layers],
        "layer_params_before": before, "layer_params_after": after, "removed_fraction": 1 - after / before,
    }
