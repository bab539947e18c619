"""HPL in your own training loop: your model, your optimiser, the loss under jax.jit, a k-means refresh of the
coarse level between epochs, and Recall@1 on unseen classes at the end.

    pip install .                      # or: pip install -r requirements.txt, from a checkout
    python docs/own_training_loop.py   # about half a minute on a 2-core CPU

The data are the embedded default dataset (hpl_jax.data.synthetic, 40 training and 40 unseen test classes in 8
families, 32x32 images). Nothing here uses the project's trainer: this is the whole loop.
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


def main(epochs=8, batch_size=64, seed=0):
    images, labels, _, _ = synthetic.generate_splits(seed)
    train_images, train_labels = center_crop(images["train"]), labels["train"]
    num_classes = int(train_labels.max()) + 1

    model = Embedder()
    model_key, proxy_key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(model_key, train_images[:1])["params"]
    # Two levels: one proxy per class, and K_1 = 8 coarse proxies over them (k-means of the fine proxies).
    hierarchy = hpl_jax.init_hierarchy(proxy_key, num_classes, num_coarse=(8,), dim=model.dim, seed=seed)
    # The Proxy-Anchor recipe: AdamW, the proxies at 100x the network's learning rate.
    trainable = {"model": params, "proxies": hierarchy.proxies}
    optimizer = optax.multi_transform(
        {"model": optax.adamw(1e-3, weight_decay=1e-4), "proxies": optax.adamw(1e-1, weight_decay=1e-4)},
        {"model": "model", "proxies": "proxies"})
    opt_state = optimizer.init(trainable)
    base_loss = functools.partial(hpl_jax.proxy_anchor_loss, alpha=32.0, delta=0.1)

    @jax.jit
    def train_step(trainable, opt_state, parents, images, labels):
        def hpl_loss(trainable):
            embeddings = model.apply({"params": trainable["model"]}, images)
            hierarchy = hpl_jax.ProxyHierarchy(proxies=trainable["proxies"], parents=parents)
            total, _ = hpl_jax.hierarchical_proxy_loss(embeddings, labels, hierarchy, base_loss=base_loss,
                                                       weights=(1.0, 0.1))
            return total

        loss, grads = jax.value_and_grad(hpl_loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    embed = jax.jit(lambda params, images: model.apply({"params": params}, images))

    def test_recall_at_1(params):
        embeddings = embed(params, center_crop(images["test"]))
        return hpl_jax.retrieval_metrics(np.asarray(embeddings), labels["test"], nmi=False)["recall@1"]

    untrained = test_recall_at_1(trainable["model"])
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(len(train_labels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            trainable, opt_state, loss = train_step(trainable, opt_state, hierarchy.parents,
                                                    train_images[rows], train_labels[rows])
        # Between epochs, on the host: re-group the trained fine proxies. 'rematch' keeps each coarse proxy
        # (and so its optimiser state) and gives it the new cluster most like it.
        hierarchy, _ = hpl_jax.refresh_hierarchy(hierarchy.replace(proxies=trainable["proxies"]), seed=epoch,
                                                 policy="rematch")
        trainable = {**trainable, "proxies": hierarchy.proxies}
        print(f"epoch {epoch + 1}: loss {float(loss):.3f}")
    trained = test_recall_at_1(trainable["model"])
    print(f"test Recall@1 (unseen classes): {untrained:.4f} untrained -> {trained:.4f} after {epochs} epochs")
    return untrained, trained


if __name__ == "__main__":
    main()
