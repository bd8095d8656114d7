/**
 * Memory barriers for rings shared with another process (the guest, through the front-end's memfds).
 *
 * JavaScript has no fence primitive, but it has sequentially consistent atomics. On x86-64, V8 compiles
 * `Atomics.store` to an `xchg` instruction, which carries an implicit `lock` prefix and therefore
 * orders every earlier load and store of this thread, to any memory, before every later one: a full
 * barrier, equivalent to `mfence` for ordinary write-back memory (Intel SDM vol. 3A §9.2.3, "Locked
 * instructions have a total order"). The store goes to a private SharedArrayBuffer that nothing else
 * reads; only its side effect matters. TurboFan keeps typed-array loads and stores in program order
 * around atomics (they share one effect chain), so the compiler does not move ring accesses across
 * the fence either.
 *
 * Which barriers virtio needs, given x86-64's TSO model (loads are not reordered with loads, stores
 * are not reordered with stores, a load may pass an earlier store to a different location):
 * - read barrier (avail idx, then ring entries and descriptors): free on x86-64; program order suffices.
 * - write barrier (used entries, then used idx / first used flags): free on x86-64; program order.
 * - full barrier (a store that must be visible before a later load: publishing used idx before
 *   reading used_event, writing avail_event before re-reading avail idx): {@link fullFence}.
 *
 * On other architectures (arm64 compiles `Atomics.store` to `stlr`, which is not a full fence for
 * plain accesses) this module would need revisiting; vhostd targets x86-64 Linux hosts.
 */

const fenceCell = new Int32Array(new SharedArrayBuffer(4));

/** A full memory barrier (store→load ordering included). See the module comment for why this works. */
export function fullFence(): void {
  Atomics.store(fenceCell, 0, 0);
}
