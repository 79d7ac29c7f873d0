"""The usage-dependency tree: virtual root → adapters → each adapter's KV prefix trie.

A KV block computed under adapter A is only meaningful with A, so it hangs
below A's node; a block's KV also depends on every token before it, so it
hangs below the node of the block before it. Matching a request walks exactly
that path. Nodes record where their bytes are (tier and block ids) and how
they are used (visits, last use, pins); the data itself lives in the
executor's tiers. Pure bookkeeping: no torch, no policy.

KV children are keyed by the block's token ids themselves (a tuple), so two
different token blocks can never alias the way two equal hashes could.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


class Tier(enum.Enum):
    __hash__ = object.__hash__  # members are singletons; Enum's own hash is slow Python on a hot path

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    """Adapters only: on neither tier, read from their directory on demand."""


class Kind(enum.Enum):
    __hash__ = object.__hash__

    ROOT = "root"
    LORA = "lora"
    KV = "kv"


BASE = "base"
"""Key of the pseudo-adapter node that holds base-model (no adapter) KV. It has
no weights, so it is a non-local adapter (see `Node.local`): always 'on the device'."""


@dataclass(eq=False)
class Node:
    kind: Kind
    key: object
    """Adapter id for LORA nodes; the block's token ids (a tuple) for KV nodes."""

    parent: Node | None
    tier: Tier
    blocks: list[int] = field(default_factory=list)
    """Block ids on `tier` (empty on disk and for the root and base nodes)."""

    num_blocks: int = 0
    """Size in blocks wherever the node is (an adapter's size is its rank slices)."""

    num_bytes: int = 0
    children: dict[object, Node] = field(default_factory=dict)
    num_device_children: int = 0
    visits: int = 1
    last_use: float = 0.0
    pins: int = 0
    """Running (or admitted, waiting) requests whose path includes this node."""

    in_transfer: bool = False
    """A copy to or from this node is in flight; it may not move again until done."""

    local: bool = True
    """Whether the node's bytes live in this cache's blocks. An adapter's identity
    (the namespace its KV hangs under) is its node; whether its weights are here
    is this flag. False for the base pseudo-adapter (no weights) and for an
    adapter served from elsewhere (a remote LoRA server): zero blocks, always on
    the device tier, never moved or counted, so its KV needs nothing copied first."""

    depth: int = 0
    seq: int = 0
    """Creation order: breaks ties between equal scores the same way in every run
    (an address would not), so the engine and the simulator decide alike."""

    @property
    def adapter(self) -> object:
        """Key of the adapter branch this node belongs to."""
        node = self
        while node.kind is Kind.KV:
            node = node.parent
        return node.key

    @property
    def status(self) -> str:
        """E-CODE's node states: RUNNING (pinned), PENDING (copy in flight), STABLE."""
        return "running" if self.pins else "pending" if self.in_transfer else "stable"

    @property
    def movable(self) -> bool:
        return not self.pins and not self.in_transfer and self.kind is not Kind.ROOT and self.local

    def ancestors(self):
        node = self.parent
        while node is not None and node.kind is not Kind.ROOT:
            yield node
            node = node.parent

    def __repr__(self) -> str:  # keys can be long token tuples
        return f"Node({self.kind.value}, {self.tier.value}, {self.num_blocks} blocks, depth {self.depth})"


class DependencyTree:
    """Structure and per-tier indexes; the manager decides what moves."""

    def __init__(self) -> None:
        self.root = Node(Kind.ROOT, None, None, Tier.DEVICE)
        self.adapters: dict[object, Node] = {}
        self.on_tier: dict[Tier, set[Node]] = {t: set() for t in Tier}
        """Every LORA/KV node by tier."""

        self.device_leaves: set[Node] = set()
        """Device nodes with no device children: where device evictions start."""

        self.host_roots: set[Node] = set()
        """Host nodes whose parent is on the device: where swap-ins start."""

        self.resident: set[object] = set()
        """Keys of the adapters whose weights are on the device (what an
        instance reports to the router; kept as nodes move, so reading it is free)."""

        self._seq = itertools.count(1)

    def add_adapter(self, key: object, tier: Tier, num_blocks: int, num_bytes: int, now: float,
                    local: bool = True) -> Node:
        node = Node(Kind.LORA, key, self.root, tier, num_blocks=num_blocks, num_bytes=num_bytes,
                    last_use=now, local=local, depth=1, seq=next(self._seq))
        self._link(node)
        self.adapters[key] = node
        return node

    def add_kv(self, parent: Node, tokens: tuple[int, ...], tier: Tier, block: int, num_bytes: int,
               now: float) -> Node:
        node = Node(Kind.KV, tokens, parent, tier, blocks=[block], num_blocks=1, num_bytes=num_bytes,
                    last_use=now, depth=parent.depth + 1, seq=next(self._seq))
        self._link(node)
        return node

    def _link(self, node: Node) -> None:
        node.parent.children[node.key] = node
        if node.tier is Tier.DEVICE:
            node.parent.num_device_children += 1
        self.on_tier[node.tier].add(node)
        self._track(node)
        self._refresh(node)
        self._refresh(node.parent)

    def remove(self, node: Node) -> None:
        """Unlink a node with no children (drop it from the cache)."""
        assert not node.children, "remove leaves only"
        del node.parent.children[node.key]
        if node.tier is Tier.DEVICE:
            node.parent.num_device_children -= 1
        self.on_tier[node.tier].discard(node)
        self.device_leaves.discard(node)
        self.host_roots.discard(node)
        self._refresh(node.parent)
        if node.kind is Kind.LORA:
            del self.adapters[node.key]
            self.resident.discard(node.key)

    def move(self, node: Node, tier: Tier, blocks: list[int]) -> None:
        if node.tier is Tier.DEVICE:
            node.parent.num_device_children -= 1
        if tier is Tier.DEVICE:
            node.parent.num_device_children += 1
        self.on_tier[node.tier].discard(node)
        self.on_tier[tier].add(node)
        node.tier, node.blocks = tier, blocks
        self._track(node)
        self._refresh(node)
        self._refresh(node.parent)
        for child in node.children.values():  # a child's parent changed tier
            self._refresh(child)

    def _track(self, node: Node) -> None:
        if node.kind is Kind.LORA and node.local:
            (self.resident.add if node.tier is Tier.DEVICE else self.resident.discard)(node.key)

    def _refresh(self, node: Node) -> None:
        if node.kind is Kind.ROOT or not node.local:
            return
        if node.tier is Tier.DEVICE and not node.num_device_children:
            self.device_leaves.add(node)
        else:
            self.device_leaves.discard(node)
        if node.tier is Tier.HOST and node.parent.tier is Tier.DEVICE:
            self.host_roots.add(node)
        else:
            self.host_roots.discard(node)

    def match(self, adapter: Node, token_ids: list[int], block_size: int, max_blocks: int) -> list[Node]:
        """The longest cached path of full blocks under `adapter`, at most max_blocks long."""
        path, node = [], adapter
        for i in range(max_blocks):
            child = node.children.get(tuple(token_ids[i * block_size:(i + 1) * block_size]))
            if child is None:
                break
            path.append(child)
            node = child
        return path

    def subtree(self, node: Node) -> list[Node]:
        """The node and all its descendants, children before parents."""
        out, stack = [], [node]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out[::-1]

    def nodes(self):
        for tier in Tier:
            yield from self.on_tier[tier]
