"""HPL in your own training loop: your model, your optax optimiser, the loss under jax.jit, the method's first
grouping from class means, a k-means refresh of the coarse level between epochs with the default 'reset' policy
(and the reset proxies' optimiser state), and Recall@1 on unseen classes at the end.

From a checkout (python puts docs/ on sys.path, not the repository, hence PYTHONPATH):

    pip install -r requirements.txt
    PYTHONPATH=. python docs/own_training_loop.py     # or: pip install . && python docs/own_training_loop.py

The data are the embedded default dataset (hpl_jax.data.synthetic: 40 training and 40 unseen test classes in 8
families, 32x32 images). Nothing here uses the project's trainer: this is the whole loop. Run on several devices
with the global-batch gather: docs/multi_device_loss.py. Both run in the tests (tests/test_examples.py).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import hpl_jax
from hpl_jax.data import synthetic


class Embedder(nn.Module):
    """A small convolutional network: u8 images [batch, 32, 32, 3] -> embeddings f32[batch, dim]."""

    dim: int = 64

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32) / 255.0 - 0.5
        for features in (32, 64, 128):
            x = nn.relu(nn.Conv(features, (3, 3), strides=2)(x))
        return nn.Dense(self.dim)(jnp.mean(x, axis=(1, 2)) + jnp.max(x, axis=(1, 2)))


def center_crop(images, size=32):
    offset = (images.shape[1] - size) // 2
    return images[:, offset:offset + size, offset:offset + size]


def padded_batches(order, batch_size):
    """Row indices i64[batch_size] and mask bool[batch_size] of every batch of one epoch: the last, partial batch
    is padded (mask False), so every image is seen and the step compiles for one shape only."""
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        mask = np.arange(batch_size) < len(rows)
        yield np.resize(rows, batch_size), mask


def main(epochs=8, batch_size=64, seed=0):
    images, labels, _, _ = synthetic.generate_splits(seed)
    train_images, train_labels = center_crop(images["train"]), labels["train"]
    num_classes = int(train_labels.max()) + 1

    model = Embedder()
    model_key, proxy_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(model_key, train_images[:1])["params"]
    embed = jax.jit(lambda params, images: model.apply({"params": params}, images))

    # The first grouping (the method's default): k-means of the class means of the training embeddings under the
    # initial network, K_1 = 8 coarse proxies over the 40 fine ones.
    means = hpl_jax.class_means(np.asarray(embed(params, train_images)), train_labels, num_classes)
    hierarchy = hpl_jax.init_hierarchy(proxy_key, num_classes, num_coarse=(8,), dim=model.dim,
                                       level1_vectors=means, seed=seed)

    # The Proxy-Anchor recipe: AdamW, the proxies at 100x the network's learning rate. Each proxy level is a group
    # of its own, so a refresh can give the coarse proxies it resets a fresh optimiser state.
    trainable = {"model": params, "proxies": hierarchy.proxies}
    groups = {"model": "model", "proxies": ("fine", "coarse_1")}
    optimizer = optax.partition(
        {"model": optax.adamw(1e-3, weight_decay=1e-4), "fine": optax.adamw(1e-1, weight_decay=1e-4),
         "coarse_1": optax.adamw(1e-1, weight_decay=1e-4)}, groups)
    opt_state = optimizer.init(trainable)
    base_loss = functools.partial(hpl_jax.proxy_anchor_loss, alpha=32.0, delta=0.1)

    @jax.jit
    def train_step(trainable, opt_state, parents, images, labels, mask):
        def hpl_loss(trainable):
            embeddings = model.apply({"params": trainable["model"]}, images)
            hierarchy = hpl_jax.ProxyHierarchy(proxies=trainable["proxies"], parents=parents)
            # Padded rows (mask False) are neither positives nor negatives of any proxy.
            total, _ = hpl_jax.hierarchical_proxy_loss(embeddings, labels, hierarchy, base_loss=base_loss,
                                                       weights=(1.0, 0.1), mask=mask)
            return total

        loss, grads = jax.value_and_grad(hpl_loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def test_recall_at_1(params):
        embeddings = embed(params, center_crop(images["test"]))
        return hpl_jax.retrieval_metrics(np.asarray(embeddings), labels["test"], nmi=False)["recall@1"]

    untrained = test_recall_at_1(trainable["model"])
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        for rows, mask in padded_batches(rng.permutation(len(train_labels)), batch_size):
            trainable, opt_state, loss = train_step(trainable, opt_state, hierarchy.parents,
                                                    train_images[rows], train_labels[rows], mask)
        # Between epochs, on the host: re-group the trained fine proxies. 'reset' (the default) sets every coarse
        # proxy to its new cluster's centre and flags it; its optimiser state starts again from optimizer.init.
        hierarchy, reset = hpl_jax.refresh_hierarchy(hierarchy.replace(proxies=trainable["proxies"]), seed=epoch)
        trainable = {**trainable, "proxies": hierarchy.proxies}
        reset_groups = [f"coarse_{level}" for level, flags in enumerate(reset, start=1) if bool(np.any(flags))]
        opt_state = hpl_jax.reset_optimizer_groups(opt_state, optimizer.init(trainable), reset_groups)
        print(f"epoch {epoch + 1}: loss {float(loss):.3f}, reset {reset_groups}")
    trained = test_recall_at_1(trainable["model"])
    print(f"test Recall@1 (unseen classes): {untrained:.4f} untrained -> {trained:.4f} after {epochs} epochs")
    return untrained, trained


if __name__ == "__main__":
    main()
