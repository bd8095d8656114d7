/**
 * The logical units the daemon serves: an image opened once, and the SCSI unit that describes it.
 */
import fs from 'node:fs';

import { ConfigError } from '../../lib/errors';
import { openBackingFile, type BackingFile } from '../../lib/io/backing-file';
import type { LunConfig } from './cli';
import { LogicalUnit, naaDesignator, type LogicalUnitOptions } from './target/logical-unit';

/** A logical unit and the image behind it. */
export class ImageUnit extends LogicalUnit {
  /** Cleared once the image's file system refused fallocate PUNCH_HOLE / ZERO_RANGE (WRITE SAME writes then). */
  punchHole = true;
  zeroRange = true;

  constructor(
    options: LogicalUnitOptions,
    readonly image: BackingFile,
    readonly target: number,
    readonly lun: number,
    /** What it was opened from (a worker thread's device opens the same). */
    readonly config?: LunConfig,
  ) {
    super(options, image.size());
  }
}

/** Open one unit's image and describe it. */
export function openUnit(u: LunConfig, direct: boolean): ImageUnit {
  const name = `--lun ${u.target}:${u.lun}=${u.file}`;
  const image: BackingFile = openBackingFile({ path: u.file, readOnly: u.readOnly, direct, names: { file: name, readOnly: ',ro', direct: '--direct' } });
  try {
    const deviceBlock = image.nativeBlockSize;
    const blockSize = u.blockSize ?? (deviceBlock === 4096 ? 4096 : 512);
    if (deviceBlock > blockSize && direct) {
      throw new ConfigError('CONFIG_INVALID', `${name}: block-size ${blockSize} is below the ${deviceBlock}-byte sectors of the device, which --direct cannot serve`);
    }
    const size = image.size();
    if (size < blockSize) throw new ConfigError('CONFIG_INVALID', `${name}: the image is ${size} bytes, smaller than one ${blockSize}-byte block`);
    // A stable WWN: from the serial when there is one, else from the address and the image path.
    const identity = u.serial !== '' ? `serial:${u.serial}` : `${u.target}:${u.lun}:${fs.realpathSync(u.file)}`;
    return new ImageUnit({ blockSize, readOnly: u.readOnly, discard: u.discard, serial: u.serial, naa: naaDesignator(identity) }, image, u.target, u.lun, u);
  } catch (err) {
    image.close();
    throw err;
  }
}
