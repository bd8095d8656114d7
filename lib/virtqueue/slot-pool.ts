/**
 * Preallocated per-request state of one queue: a slot per ring entry (a queue never has more chains
 * in flight than its size), handed out and taken back without allocation through a stack of free
 * indexes. A device parses a chain into the slot {@link peek} shows, {@link take}s it only when the
 * request goes asynchronous, and {@link put}s it back when the request completes. A slot's `index`
 * is what travels in an I/O op's userData.
 */
export class SlotPool<T extends { readonly index: number }> {
  readonly slots: T[] = [];
  private free = new Int32Array(0);
  private top = 0;

  constructor(private readonly create: (index: number) => T) {}

  /** Grow to at least `size` slots. Only while every slot is free (the queue is starting). */
  ensure(size: number): void {
    if (this.slots.length >= size) return;
    for (let i = this.slots.length; i < size; i++) this.slots.push(this.create(i));
    this.free = new Int32Array(this.slots.length);
    this.top = 0;
    for (let i = this.slots.length - 1; i >= 0; i--) this.free[this.top++] = i;
  }

  /** The slot {@link take} hands out next, or undefined when every slot is in use. */
  peek(): T | undefined {
    return this.top === 0 ? undefined : this.slots[this.free[this.top - 1]!];
  }

  /** Take the slot {@link peek} showed (the caller checked there was one). */
  take(): T {
    return this.slots[this.free[--this.top]!]!;
  }

  /** A taken slot is free again. */
  put(slot: T): void {
    this.free[this.top++] = slot.index;
  }
}
