/**
 * How the native helper lays out mmap views. Kept apart from `index.ts` so that code needing only
 * these numbers does not load the addon.
 */

/** Views cover 1 GiB strides (typed arrays are limited in size; a 64 GiB guest needs many views). */
export const MAP_VIEW_STRIDE = 1 << 30;
/** Extra bytes each view extends past its stride, so that rings never straddle two views. */
export const MAP_VIEW_SLACK = 2 << 20;
