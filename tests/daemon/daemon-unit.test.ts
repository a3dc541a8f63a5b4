/**
 * Daemon pieces that need no ublk kernel: the ABI encodings (opcodes as Linux 6.12's ioctl numbers;
 * ublksrv_ctrl_cmd, ublksrv_io_cmd, ublksrv_ctrl_dev_info and ublk_params little-endian at the field
 * offsets of the 6.12 uapi structs), fast-path routing through the shared engine view, the
 * main→worker completion ring, instance configuration and state files.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  UBLK_U_CMD_ADD_DEV, UBLK_U_CMD_DEL_DEV, UBLK_U_CMD_GET_DEV_INFO, UBLK_U_CMD_GET_FEATURES, UBLK_U_CMD_SET_PARAMS,
  UBLK_U_CMD_START_DEV, UBLK_U_CMD_STOP_DEV, UBLK_U_IO_COMMIT_AND_FETCH_REQ, UBLK_U_IO_FETCH_REQ,
  UBLK_U_CMD_DEL_DEV_ASYNC, UBLK_U_CMD_UPDATE_SIZE, UBLK_U_CMD_QUIESCE_DEV, UBLK_U_CMD_TRY_STOP_DEV,
  UBLK_U_IO_REGISTER_IO_BUF, UBLK_U_IO_UNREGISTER_IO_BUF, UBLK_U_IO_PREP_IO_CMDS, UBLK_U_IO_COMMIT_IO_CMDS,
  UBLK_U_IO_FETCH_IO_CMDS, UBLK_F_SHMEM_ZC, UBLK_U_CMD_START_USER_RECOVERY, UBLK_U_CMD_END_USER_RECOVERY, LEGACY,
  FVD_SERVER_TAG, UBLK_F_USER_RECOVERY, UBLK_S_DEV_QUIESCED, UBLK_S_DEV_LIVE, UBLK_S_DEV_DEAD, UBLK_F_QUIESCE, UBLK_F_USER_RECOVERY_REISSUE,
  decodeDevInfo, encodeCtrlCmd, encodeDevInfo, encodeIoCmd, encodeParams,
} from '../../daemon/ublk/abi.js';
import { describeFeatures, featureNames } from '../../daemon/ublk/features.js';
import { IoDescriptor, readIoDescriptor } from '../../daemon/ublk/queue-loop.js';
import {
  UD_KIND_EVENT, UD_KIND_TARGET_IO, UD_KIND_UBLK_CMD,
  decodeUserData, encodeUserData, userDataKind, userDataTag, userDataTargetData,
} from '../../daemon/ublk/user-data.js';
import { fileURLToPath } from 'node:url';
import { CompletionRing, StoredRing, type EngineView } from '../../daemon/shared-state.js';
import { SpscRing } from '../../daemon/spsc-ring.js';
import { Worker } from 'node:worker_threads';
import { storedHost } from '../helpers/stored-host.js';
import { Prefetcher } from '../../fvd/prefetch.js';
import { readInstanceConfig } from '../../daemon/instance-config.js';
import { ACTIVITY_OTHER, ACTIVITY_READ, ACTIVITY_WRITE, QueueActivityReader, QueueActivityWriter, newActivityBuffer } from '../../daemon/queue-activity.js';
import { listStates, removeState, writeState } from '../../daemon/state.js';
import { FvdImage } from '../../fvd/image.js';
import { BASE, directRoute, newRun } from '../../fvd/mapping.js';
import { nodeIo } from '../../storage/node-file.js';
import { RECOVERY_FLAGS, addDevFlags, isOurs, recoverySize, serverFlagsFor, startRecoveryRetrying, startRefusal } from '../../daemon/recovery.js';
import type { UblkControl } from '../../daemon/ublk/control.js';

test('ublk opcodes are the ioctl encodings of Linux 6.12', () => {
  assert.is(UBLK_U_CMD_GET_DEV_INFO, 0x80207502);
  assert.is(UBLK_U_CMD_ADD_DEV, 0xc0207504);
  assert.is(UBLK_U_CMD_DEL_DEV, 0xc0207505);
  assert.is(UBLK_U_CMD_START_DEV, 0xc0207506);
  assert.is(UBLK_U_CMD_STOP_DEV, 0xc0207507);
  assert.is(UBLK_U_CMD_SET_PARAMS, 0xc0207508);
  assert.is(UBLK_U_CMD_GET_FEATURES, 0x80207513);
  assert.is(UBLK_U_IO_FETCH_REQ, 0xc0107520);
  assert.is(UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc0107521);
});

test('user recovery commands: ioctl and legacy encodings', () => {
  assert.is(UBLK_U_CMD_START_USER_RECOVERY, 0xc0207510);
  assert.is(UBLK_U_CMD_END_USER_RECOVERY, 0xc0207511);
  assert.is(LEGACY.START_USER_RECOVERY, 0x10);
  assert.is(LEGACY.END_USER_RECOVERY, 0x11);
});

test('recovery: a waiting device is ours only when tag, file crc, flags and geometry all agree', () => {
  const st = { name: 'a', devId: 3, device: '/dev/ublkb3', image: '/i', pid: 1, size: 1, queues: 2, depth: 64, startedAt: '', fileId: '8:1:77', bootId: 'b', maxIo: 524288 };
  const info = { nrHwQueues: 2, queueDepth: 64, state: UBLK_S_DEV_QUIESCED, maxIoBufBytes: 524288, devId: 3, ublksrvPid: 1, flags: RECOVERY_FLAGS | 0x40n, ublksrvFlags: serverFlagsFor('8:1:77') };
  assert.ok(isOurs(info, st));
  assert.is(serverFlagsFor('8:1:77') & FVD_SERVER_TAG, FVD_SERVER_TAG);
  assert.is.not(serverFlagsFor('8:1:77'), serverFlagsFor('8:1:78'));
  assert.not.ok(isOurs({ ...info, ublksrvFlags: serverFlagsFor('8:1:78') }, st), 'another image');
  assert.not.ok(isOurs({ ...info, ublksrvFlags: FVD_SERVER_TAG }, st), 'tag without the file crc');
  assert.not.ok(isOurs({ ...info, flags: UBLK_F_USER_RECOVERY }, st), 'no REISSUE');
  assert.not.ok(isOurs({ ...info, queueDepth: 128 }, st), 'other geometry');
  assert.not.ok(isOurs({ ...info, devId: 4 }, st), 'other id');
  assert.not.ok(isOurs(info, { ...st, fileId: undefined }), 'state file without recovery');
});

test('recovery size: equal is normal, a smaller device is a pending grow, a larger one is refused', () => {
  const M = 1 << 20;
  assert.equal(recoverySize(3, (64 * M) / 512, 64 * M), { deviceBytes: 64 * M, pendingGrow: false });
  // An online grow interrupted after its header write, before UPDATE_SIZE: served at the old size.
  assert.equal(recoverySize(3, (64 * M) / 512, 128 * M), { deviceBytes: 64 * M, pendingGrow: true });
  assert.equal(recoverySize(3, 1, 1024), { deviceBytes: 512, pendingGrow: true });
  // A device larger than its image: no state fvd leaves; one line naming both sizes.
  assert.throws(
    () => recoverySize(3, (128 * M) / 512, 64 * M),
    (e: Error) => e.message === 'device 3 has 262144 sectors but the image is 131072: not recovering it (a device larger than its image)' && (e as { code?: string }).code === 'EINVAL',
  );
  assert.throws(() => recoverySize(3, (64 * M) / 512 + 1, 64 * M), /not recovering it/);
});

test('recovery: a refused START_USER_RECOVERY is retried (EBUSY), continued (EINVAL on our QUIESCED device, 6.12) or fatal', () => {
  const info = { nrHwQueues: 2, queueDepth: 64, state: UBLK_S_DEV_QUIESCED, maxIoBufBytes: 524288, devId: 3, ublksrvPid: 9, flags: RECOVERY_FLAGS, ublksrvFlags: serverFlagsFor('8:1:77') };
  assert.is(startRefusal(-16, null), 'retry', 'EBUSY: the old server still holds /dev/ublkcN');
  assert.is(startRefusal(-22, info), 'continue', 'EINVAL on our waiting device: an interrupted recovery');
  assert.is(startRefusal(-22, null), 'fail', 'the device is gone');
  assert.is(startRefusal(-22, { ...info, state: UBLK_S_DEV_LIVE }), 'fail', 'not waiting');
  assert.is(startRefusal(-22, { ...info, state: UBLK_S_DEV_DEAD }), 'fail', 'dead');
  assert.is(startRefusal(-22, { ...info, flags: UBLK_F_USER_RECOVERY }), 'fail', 'without REISSUE');
  assert.is(startRefusal(-22, { ...info, ublksrvFlags: 0n }), 'fail', 'not fvd\'s');
  assert.is(startRefusal(-1, info), 'fail', 'EPERM');
});

test('recovery: START_USER_RECOVERY refused with EBUSY past the limit (/dev/ublkcN held, 7.x): one line, the device keeps waiting', async () => {
  let starts = 0;
  const ctl = {
    startUserRecovery: async () => {
      starts++;
      throw Object.assign(new Error('ublk START_USER_RECOVERY failed: EBUSY'), { errno: -16 });
    },
    deviceInfo: async () => null,
  } as unknown as UblkControl;
  const err = await startRecoveryRetrying(ctl, 4, 30).then(() => null, (e: Error) => e);
  assert.ok(starts >= 2, `retried (${starts} STARTs)`);
  assert.is(
    err?.message,
    'device 4 cannot be recovered now: START_USER_RECOVERY still refused (EBUSY) after 0.03 s: /dev/ublkc4 is still held (by the previous server\'s process, not yet exited, or by another process); the device keeps waiting',
  );
  assert.is((err as { code?: string }).code, 'EBUSY');
});

test('ADD_DEV flags: QUIESCE only for a recoverable device and only when the kernel offers it', () => {
  const offered73 = 0x1fffffn; // a 7.3 kernel offering bits 0-20
  const offered612 = 0x1ffn; // 6.12: bits 0-8, no QUIESCE
  assert.is(addDevFlags(true, offered73), UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_QUIESCE);
  assert.is(addDevFlags(true, offered612), RECOVERY_FLAGS);
  assert.is(addDevFlags(true, null), RECOVERY_FLAGS, 'no GET_FEATURES (< 6.5)');
  // The kernel refuses QUIESCE without USER_RECOVERY (EINVAL at ADD_DEV).
  assert.is(addDevFlags(false, offered73), 0n);
  // QUIESCE_DEV: data[0] is the time-out in ms, no buffer (addr 0, len 0).
  const dv = new DataView(new ArrayBuffer(32));
  encodeCtrlCmd(dv, 0, 3, 0, 0, 10_000);
  assert.is(dv.getUint32(0, true), 3);
  assert.is(dv.getUint16(6, true), 0);
  assert.is(dv.getBigUint64(8, true), 0n);
  assert.is(dv.getBigUint64(16, true), 10_000n);
});

test('ublk commands after 6.12: ioctl encodings of the 7.x uapi header', () => {
  // _IOR/_IOWR('u', nr, struct ublksrv_ctrl_cmd [32 B] | ublksrv_io_cmd [16 B] | ublk_batch_io [16 B])
  assert.is(UBLK_U_CMD_DEL_DEV_ASYNC, 0x80207514); // _IOR, unlike the other control commands
  assert.is(UBLK_U_CMD_UPDATE_SIZE, 0xc0207515);
  assert.is(UBLK_U_CMD_QUIESCE_DEV, 0xc0207516);
  assert.is(UBLK_U_CMD_TRY_STOP_DEV, 0xc0207517);
  assert.is(UBLK_U_IO_REGISTER_IO_BUF, 0xc0107523);
  assert.is(UBLK_U_IO_UNREGISTER_IO_BUF, 0xc0107524);
  assert.is(UBLK_U_IO_PREP_IO_CMDS, 0xc0107525);
  assert.is(UBLK_U_IO_COMMIT_IO_CMDS, 0xc0107526);
  assert.is(UBLK_U_IO_FETCH_IO_CMDS, 0xc0107527);
});

test('ublk feature bits are named as in the uapi header', () => {
  // ublksrv prints the flags a 6.x kernel gives a recoverable device as
  // "0x4a [URING_CMD_COMP_IN_TASK RECOVERY CMD_IOCTL_ENCODE]".
  assert.equal(featureNames(0x4an), ['URING_CMD_COMP_IN_TASK', 'USER_RECOVERY', 'CMD_IOCTL_ENCODE']);
  assert.equal(featureNames(0n), []);
  assert.equal(featureNames(1n << 10n), ['UPDATE_SIZE']);
  assert.equal(featureNames((1n << 11n) | (1n << 13n) | (1n << 15n)), ['AUTO_BUF_REG', 'PER_IO_DAEMON', 'BATCH_IO']);
  assert.equal(featureNames(UBLK_F_SHMEM_ZC), ['SHMEM_ZC']);
  assert.equal(featureNames(1n << 20n), ['IO_DESC_SIZE']);
  // every bit up to 20 has a name (7.3's GET_FEATURES: 0x1fffff); a newer kernel's bits are still
  // shown, by number
  assert.is(featureNames(0x1fffffn).length, 21);
  assert.not.ok(featureNames(0x1fffffn).some((n) => n.startsWith('bit ')));
  assert.equal(featureNames((1n << 21n) | (1n << 63n)), ['bit 21', 'bit 63']);
  // what Debian's 7.3 gives a device that asked for nothing: the forced bits
  assert.equal(featureNames(0x26042n), ['URING_CMD_COMP_IN_TASK', 'CMD_IOCTL_ENCODE', 'PER_IO_DAEMON', 'BUF_REG_OFF_DAEMON', 'SAFE_STOP_DEV']);
});

test('the serve log line: offered and used masks, or no GET_FEATURES', () => {
  assert.is(
    // what Debian's 6.12 reports (ZERO_COPY is left out: 6.12 cannot do it yet)
    describeFeatures('6.12.1', 0x1fen, 0x42n),
    'ublk on Linux 6.12.1: kernel features 0x1fe (URING_CMD_COMP_IN_TASK NEED_GET_DATA USER_RECOVERY ' +
      'USER_RECOVERY_REISSUE UNPRIVILEGED_DEV CMD_IOCTL_ENCODE USER_COPY ZONED); this device uses 0x42 (URING_CMD_COMP_IN_TASK CMD_IOCTL_ENCODE)',
  );
  assert.match(describeFeatures('6.1.0', null, 0n), /kernel features unknown \(no GET_FEATURES: Linux < 6\.5\); this device uses 0x0 \(none\)$/);
});

test('struct encodings: ctrl cmd, io cmd, dev info, params at their offsets', () => {
  const b = new Uint8Array(64);
  const dv = new DataView(b.buffer);
  encodeCtrlCmd(dv, 0, 7, 0x1234_5678_9a, 64, 4242);
  assert.is(dv.getUint32(0, true), 7);
  assert.is(dv.getUint16(4, true), 0xffff);
  assert.is(dv.getUint16(6, true), 64);
  assert.is(dv.getBigUint64(8, true), 0x1234_5678_9an);
  assert.is(dv.getBigUint64(16, true), 4242n);
  encodeIoCmd(dv, 32, 1, 77, -5, 0x7fff_1234_5000);
  assert.is(dv.getUint16(32, true), 1);
  assert.is(dv.getUint16(34, true), 77);
  assert.is(dv.getInt32(36, true), -5);
  assert.is(dv.getBigUint64(40, true), 0x7fff_1234_5000n);
  const info = encodeDevInfo({ nrHwQueues: 2, queueDepth: 128, maxIoBufBytes: 524288, devId: -1, ublksrvFlags: 0xabn << 32n });
  const back = decodeDevInfo(info);
  assert.is(back.nrHwQueues, 2);
  assert.is(back.queueDepth, 128);
  assert.is(back.maxIoBufBytes, 524288);
  assert.is(back.devId, 0xffffffff);
  assert.is(back.ublksrvFlags, 0xabn << 32n);
  const p = encodeParams({ devSectors: 2097152, logicalBsShift: 9, physicalBsShift: 12, ioOptShift: 16, ioMinShift: 12, maxSectors: 1024, attrs: 4, discardGranularity: 65536, maxDiscardSectors: 8, maxWriteZeroesSectors: 9, maxDiscardSegments: 1 });
  const pv = new DataView(p.buffer);
  assert.is(pv.getUint32(0, true), p.length);
  assert.is(pv.getUint32(4, true), 3); // BASIC | DISCARD
  assert.is(pv.getUint32(8, true), 4); // attrs: VOLATILE_CACHE
  assert.is(pv.getUint8(12), 9);
  assert.is(pv.getUint8(13), 12);
  assert.is(pv.getUint32(16, true), 1024);
  assert.is(pv.getBigUint64(24, true), 2097152n);
  assert.is(pv.getUint32(44, true), 65536);
  assert.is(pv.getUint32(48, true), 8);
  assert.is(pv.getUint32(52, true), 9);
  assert.is(pv.getUint16(56, true), 1);
});

test('queue user_data: tag, kind and target data round-trip as a plain number below 2^53', () => {
  for (const kind of [UD_KIND_UBLK_CMD, UD_KIND_TARGET_IO, UD_KIND_EVENT, 255]) {
    for (const tag of [0, 1, 4095, 65535]) {
      for (const targetData of [0, 1, 0x1234, 65535]) {
        const ud = encodeUserData(tag, kind, targetData);
        assert.ok(Number.isSafeInteger(ud) && ud >= 0, `${ud}`);
        assert.is(userDataTag(ud), tag);
        assert.is(userDataKind(ud), kind);
        assert.is(userDataTargetData(ud), targetData);
        assert.equal(decodeUserData(ud), { tag, kind, targetData });
      }
    }
  }
  // The three kinds the loop dispatches on are distinct for the same tag.
  const kinds = new Set([UD_KIND_UBLK_CMD, UD_KIND_TARGET_IO, UD_KIND_EVENT].map((k) => encodeUserData(7, k)));
  assert.is(kinds.size, 3);
  // A ublk command's user_data is its tag (what the kernel's own examples use too).
  assert.is(encodeUserData(42, UD_KIND_UBLK_CMD), 42);
});

test('queue descriptors: struct ublksrv_io_desc decoded at its tag, into the one reused object', () => {
  const descs = new DataView(new ArrayBuffer(24 * 4));
  const at = 24 * 3;
  descs.setUint32(at, 1 | (1 << 13), true); // WRITE | FUA
  descs.setUint32(at + 4, 1024, true);
  descs.setBigUint64(at + 8, 0x1_2345_6789n, true); // above 2^32 sectors
  descs.setBigUint64(at + 16, 0xdead_beefn, true); // addr: not decoded
  const iod = new IoDescriptor();
  assert.is(readIoDescriptor(descs, 3, iod), iod);
  assert.is(iod.op, 1);
  assert.is(iod.opFlags, 1 | (1 << 13));
  assert.is(iod.opFlags >>> 8, (1 << 13) >>> 8);
  assert.is(iod.nrSectors, 1024);
  assert.is(iod.startSector, 0x1_2345_6789);
  readIoDescriptor(descs, 0, iod);
  assert.equal([iod.op, iod.opFlags, iod.nrSectors, iod.startSector], [0, 0, 0, 0]);
});

test('daemon/ublk/ knows ublk, not FVD: it imports only node:, ffi/ and its own files', () => {
  const dir = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'daemon', 'ublk');
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.js'));
  assert.ok(files.includes('queue-loop.js'));
  for (const f of files) {
    const text = fs.readFileSync(path.join(dir, f), 'utf8');
    const specs = [...text.matchAll(/^\s*(?:import|export)\b[^;]*?from\s+['"]([^'"]+)['"]/gms)].map((m) => m[1]!);
    if (f === 'queue-loop.js' || f === 'control.js') assert.ok(specs.includes('./abi.js'), `${f}: its imports were not found`);
    if (f === 'control.js') assert.ok(specs.includes('./errors.js'), 'control.js: its error type was not found');
    // Its errors are its own (./errors.js), not the engine's FvdError.
    for (const spec of specs) assert.ok(spec.startsWith('node:') || spec.startsWith('../../ffi/') || /^\.\/[^/]+$/.test(spec), `${f} imports ${spec}`);
  }
});

function view(over: Partial<EngineView>): EngineView {
  return {
    liveSize: new Float64Array([1 << 20]), dataOffset: 1 << 20, blockSize: 4096, chunkSize: 65536, baseLimit: 0, baseBlocks: 0, bitmapEnd: 0, allLocal: true,
    fullyLocal: new Int32Array(1), present: new Uint8Array(32), journaled: new Uint8Array(32), table: null, encrypted: false, shared: null, ...over,
  };
}

test('storedHost: raw-like, base blocks, journaled bits for writes, compact chunks', () => {
  assert.is(storedHost(view({}), 8192, 4096, true), (1 << 20) + 8192);
  const present = new Uint8Array(32);
  const journaled = new Uint8Array(32);
  const v = view({ allLocal: false, baseLimit: 100 * 4096, baseBlocks: 100, bitmapEnd: 100 * 4096, present, journaled });
  assert.is(storedHost(v, 0, 4096, false), -1, 'base block: the engine reads it');
  present[0] = 0b11;
  assert.is(storedHost(v, 0, 8192, false), 1 << 20, 'local blocks: direct read');
  assert.is(storedHost(v, 0, 8192, true), -1, 'a write to a present block whose bit is not journaled goes to the engine');
  journaled[0] = 0b11;
  assert.is(storedHost(v, 4096, 4096, true), (1 << 20) + 4096);
  assert.is(storedHost(v, 4096, 8192, false), -1, 'spills into a base block');
  assert.is(storedHost(v, 100 * 4096, 4096, true), (1 << 20) + 100 * 4096, 'past the bitmap: always local');
  const table = new Uint32Array([5, 6, 0xffffffff, 9]);
  const c = view({ table });
  assert.is(storedHost(c, 65536 - 4096, 8192, false), (1 << 20) + 5 * 65536 + 65536 - 4096, 'adjacent chunks in storage');
  assert.is(storedHost(c, 2 * 65536, 4096, false), -1, 'unmapped chunk');
  assert.is(storedHost(c, 3 * 65536 - 4096, 8192, false), -1, 'not adjacent in storage');
});

test('storedHost follows a real engine as blocks become local', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-du-'));
  fs.writeFileSync(path.join(dir, 'b.raw'), Buffer.alloc(1 << 20, 7));
  await FvdImage.create(nodeIo, path.join(dir, 'i.fvd'), { base: 'b.raw', baseFormat: 'raw', blockSize: 4096 });
  const img = await FvdImage.open(nodeIo, path.join(dir, 'i.fvd'), { copyOnRead: false });
  const v = img.sharedView();
  assert.is(v.baseLimit, 1 << 20, 'the view knows where the base ends');
  assert.is(directRoute(v, 8192, 4096, false, newRun()), BASE, 'a block not yet local reads from the base');
  assert.is(storedHost(v, 8192, 4096, true), -1);
  await img.write(Buffer.alloc(4096, 1), 8192);
  assert.ok(storedHost(v, 8192, 4096, true) > 0, 'the worker sees the engine update the shared bitmap');
  await img.close();
  fs.rmSync(dir, { recursive: true });
});

test('storedHost: an encrypted image is routed like an unencrypted one (the worker does the crypto)', async () => {
  const full = new Uint8Array(32).fill(0xff);
  for (const v of [view({ encrypted: true }), view({ encrypted: true, table: new Uint32Array([0, 1, 2, 3]) }),
    view({ encrypted: true, allLocal: false, baseLimit: 100 * 4096, baseBlocks: 100, bitmapEnd: 100 * 4096, present: full, journaled: full })]) {
    for (const [off, write] of [[0, false], [8192, true]] as const) {
      assert.ok(storedHost(v, off, 4096, write) >= 0);
      assert.is(storedHost(v, off, 4096, write), storedHost({ ...v, encrypted: false }, off, 4096, write));
    }
  }
  // The other rules still apply: a base block not yet local goes to the engine.
  assert.is(storedHost(view({ encrypted: true, allLocal: false, baseLimit: 100 * 4096, baseBlocks: 100, bitmapEnd: 100 * 4096 }), 0, 4096, false), -1);
  // And from a real encrypted engine: local, journaled data is direct; unwritten compact chunks are not.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-du-'));
  const key = Buffer.from('k');
  await FvdImage.create(nodeIo, path.join(dir, 'e.fvd'), { size: 1 << 20, layout: 'compact', encrypt: { key, kdf: { log2N: 10 } } });
  const img = await FvdImage.open(nodeIo, path.join(dir, 'e.fvd'), { key });
  assert.is(storedHost(img.sharedView(), 8192, 4096, false), -1, 'unmapped chunk: the engine');
  await img.write(Buffer.alloc(4096, 1), 8192);
  await img.flush();
  assert.ok(storedHost(img.sharedView(), 8192, 4096, false) > 0);
  assert.ok(storedHost(img.sharedView(), 8192, 4096, true) > 0);
  await img.close();
  fs.rmSync(dir, { recursive: true });
});

test('storedHost: a write touching a chunk flagged as shared goes to the engine; reads stay direct', () => {
  const table = new Uint32Array([5, 6, 7, 0xffffffff]);
  const shared = new Uint8Array([0, 1, 0, 0]);
  const v = view({ table, shared });
  assert.is(storedHost(v, 0, 4096, true), (1 << 20) + 5 * 65536, 'private chunk: direct write');
  assert.is(storedHost(v, 65536, 4096, true), -1, 'shared chunk: the engine copies it first');
  assert.is(storedHost(v, 65536 - 4096, 8192, true), -1, 'a write spanning into a shared chunk');
  assert.is(storedHost(v, 65536, 4096, false), (1 << 20) + 6 * 65536, 'reads of a shared chunk are direct');
  shared[1] = 0;
  assert.is(storedHost(v, 65536 - 4096, 8192, true), (1 << 20) + 6 * 65536 - 4096);
});

test('a served image with snapshots: the engine copies a shared chunk, then clears its flag; the flags survive a reopen', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-du-'));
  const file = path.join(dir, 's.fvd');
  const cs = 65536;
  await FvdImage.create(nodeIo, file, { size: 1 << 20, layout: 'compact', chunkSize: cs, blockSize: 4096 });
  let img = await FvdImage.open(nodeIo, file);
  await img.write(Buffer.alloc(2 * cs, 1), 0);
  await img.snapshots.create('s');
  let v = img.sharedView();
  assert.ok(v.shared, 'compact images export the flags');
  assert.equal([...v.shared!.subarray(0, 3)], [1, 1, 0]);
  const old0 = img.inspect().table![0]!;
  assert.is(storedHost(v, 4096, 4096, true), -1);
  await img.write(Buffer.alloc(4096, 2), 4096); // what the slow path does
  assert.is(v.shared![0], 0, 'flag cleared after the copy');
  const new0 = img.inspect().table![0]!;
  assert.is.not(new0, old0);
  assert.is(storedHost(v, 4096, 4096, true), img.inspect().header.dataOffset + new0 * cs + 4096, 'the worker now writes the private copy');
  await img.write(Buffer.alloc(4096, 3), 2 * cs); // a fresh allocation is never shared
  assert.is(v.shared![2], 0);
  await img.close();
  img = await FvdImage.open(nodeIo, file);
  v = img.sharedView();
  assert.equal([...v.shared!.subarray(0, 3)], [0, 1, 0], 'rebuilt from the refcount table at open');
  await img.close();
  fs.rmSync(dir, { recursive: true });
});

test('storedHost: the shared fully-local flag stops bitmap lookups once prefetching finished while serving', async () => {
  const present = new Uint8Array(32);
  const v = view({ allLocal: false, baseLimit: 100 * 4096, baseBlocks: 100, bitmapEnd: 100 * 4096, present, journaled: new Uint8Array(32) });
  assert.is(storedHost(v, 0, 4096, true), -1);
  v.fullyLocal[0] = 1;
  assert.is(storedHost(v, 0, 4096, true), 1 << 20, 'the flag alone routes to the image');

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-du-'));
  fs.writeFileSync(path.join(dir, 'b.raw'), Buffer.alloc(1 << 20, 7));
  await FvdImage.create(nodeIo, path.join(dir, 'i.fvd'), { base: 'b.raw', baseFormat: 'raw', blockSize: 4096, detectZeroes: false });
  const img = await FvdImage.open(nodeIo, path.join(dir, 'i.fvd'), { copyOnRead: false });
  const sv = img.sharedView(); // taken once, as the server does before starting its workers
  assert.not.ok(sv.allLocal);
  assert.is(sv.fullyLocal[0], 0);
  assert.ok(sv.fullyLocal.buffer instanceof SharedArrayBuffer, 'shared with the worker threads');
  const end = await new Prefetcher(img, { minBytesPerSec: 0 }).start().finished;
  assert.is(end.state, 'done');
  assert.is(sv.fullyLocal[0], 1, 'the view taken before prefetching sees the image become fully local');
  assert.ok(storedHost(sv, 8192, 4096, true) > 0);
  await img.close();
  fs.rmSync(dir, { recursive: true });
});

test('completion ring: FIFO, wraps, drains exactly what was pushed', () => {
  const sab = CompletionRing.create(4);
  const producer = new CompletionRing(sab);
  const consumer = new CompletionRing(sab);
  const got: number[] = [];
  for (let round = 0; round < 5; round++) {
    for (let i = 0; i < 4; i++) producer.push(round * 10 + i, -i);
    assert.is(consumer.drain((tag, res) => got.push(tag, res)), 4);
  }
  assert.is(got.length, 40);
  assert.equal(got.slice(32), [40, 0, 41, -1, 42, -2, 43, -3]);
  assert.is(consumer.drain(() => assert.unreachable()), 0);
});

test('spsc ring: full is not empty, head and tail stay below 2·capacity, a drain takes what was available', () => {
  const sab = SpscRing.create(3, 2);
  const producer = new SpscRing(sab, 2);
  const consumer = new SpscRing(sab, 2);
  assert.is(consumer.available(), 0);
  let pushed = 0;
  let taken = 0;
  const push = () => {
    const at = producer.slot();
    producer.words[at] = pushed;
    producer.words[at + 1] = -pushed;
    producer.publish();
    pushed++;
  };
  // Many times around the ring, in bursts up to full: 3 entries pushed read as 3, never as 0.
  for (let round = 0; round < 1000; round++) {
    const burst = 1 + (round % 3);
    for (let i = 0; i < burst; i++) push();
    assert.is(consumer.available(), burst);
    assert.is(consumer.length, burst);
    for (let left = consumer.available(); left > 0; left--) {
      const at = consumer.oldest();
      assert.is(consumer.words[at], taken, 'FIFO, none lost or repeated');
      assert.is(consumer.words[at + 1], -taken);
      consumer.consume();
      taken++;
    }
    // The counters wrap at 2·capacity: plain counters would pass 2^31 after as many entries and
    // index outside the ring.
    assert.ok(consumer.words[0]! < 6 && consumer.words[1]! < 6, 'head and tail below 2·capacity');
  }
  assert.is(taken, pushed);
  // The wake flag: raised once per drain cycle.
  assert.ok(producer.raiseWake());
  assert.not.ok(producer.raiseWake());
  consumer.lowerWake();
  assert.ok(producer.raiseWake());
  assert.throws(() => new SpscRing(new SharedArrayBuffer(16), 2), /hold no entry/);
});

for (const depth of [1, 8]) test(`stored ring (race, depth ${depth}): a queue thread pushing while the main thread drains on wake messages; every entry once, in order, no wake lost`, async () => {
  const count = 20000;
  const ring = StoredRing.create(depth + 1);
  const completions = CompletionRing.create(depth + 1);
  const main = new StoredRing(ring);
  const back = new CompletionRing(completions);
  const worker = new Worker(new URL('../helpers/stored-ring-worker.js', import.meta.url), { workerData: { ring, completions, depth, count } });
  let next = 0;
  let wakes = 0;
  let drainedInOne = 0;
  const end = await new Promise<string>((resolve, reject) => {
    worker.on('error', reject);
    worker.on('message', (m: string) => {
      if (m !== 'wake') return resolve(m);
      wakes++;
      const n = main.drain((tag, first, last, length) => {
        assert.is(first, next, 'entries in push order, none twice or lost');
        assert.is(last, first);
        assert.is(length, tag, "the entry's words belong together");
        next++;
        // Completed inside the drain, then a little work: the worker takes the tag back and pushes
        // again while this drain still runs (after it read the tail) — the entry a lost wake strands.
        back.push(tag, length);
        const until = performance.now() + 0.02;
        while (performance.now() < until);
      });
      drainedInOne = Math.max(drainedInOne, n);
    });
  });
  await worker.terminate();
  assert.is(end, 'done', 'the worker saw every completion (no entry waited for a wake that never came)');
  assert.is(next, count);
  assert.ok(wakes <= count && wakes > 0, `${wakes} wake messages for ${count} entries`);
  console.log(`  ${count} entries, ${wakes} wake messages, up to ${drainedInOne} per drain`);
});

test('instance config: defaults, keys, errors', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-conf-'));
  process.env.FVD_CONF_DIR = dir;
  process.env.FVD_STATE_DIR = '/var/lib/fvd';
  try {
    assert.equal(readInstanceConfig('vm1'), { image: '/var/lib/fvd/vm1.fvd' });
    fs.writeFileSync(path.join(dir, 'vm2.conf'), '# comment\nIMAGE="/images/vm2.fvd"\nQUEUES=4\nCOPY_ON_READ=no\nDEV_ID=3\n');
    assert.equal(readInstanceConfig('vm2'), { image: '/images/vm2.fvd', queues: '4', copyOnRead: false, devId: '3' });
    fs.writeFileSync(path.join(dir, 'pf.conf'), 'PREFETCH=yes\nPREFETCH_RATE=50M\nPREFETCH_SHARE=5\n');
    assert.equal(readInstanceConfig('pf'), { image: '/var/lib/fvd/pf.fvd', prefetch: true, prefetchRate: '50M', prefetchShare: '5' });
    fs.writeFileSync(path.join(dir, 'zc.conf'), 'ZERO_COPY=yes\n');
    assert.equal(readInstanceConfig('zc'), { image: '/var/lib/fvd/zc.fvd', zeroCopy: true });
    fs.writeFileSync(path.join(dir, 'zc2.conf'), 'ZERO_COPY=maybe\n');
    assert.throws(() => readInstanceConfig('zc2'), /zc2\.conf:1: ZERO_COPY must be yes or no/);
    fs.writeFileSync(path.join(dir, 'enc.conf'), 'IMAGE=enc.fvd\nKEY_FILE=keys/enc.key\n');
    assert.equal(readInstanceConfig('enc'), { image: path.join(dir, 'enc.fvd'), keyFile: path.join(dir, 'keys/enc.key') });
    fs.writeFileSync(path.join(dir, 'enc2.conf'), 'KEY_FILE=\n');
    assert.throws(() => readInstanceConfig('enc2'), /enc2\.conf:1: KEY_FILE is empty/);
    fs.writeFileSync(path.join(dir, 'bad.conf'), 'IMAGE=/x\nBOGUS=1\n');
    assert.throws(() => readInstanceConfig('bad'), /bad\.conf:2: unknown key BOGUS/);
    assert.throws(() => readInstanceConfig('../etc'), /invalid instance name/);
  } finally {
    delete process.env.FVD_CONF_DIR;
    delete process.env.FVD_STATE_DIR;
    fs.rmSync(dir, { recursive: true });
  }
});

test('queue activity: latencies summed exactly across queues, sub-µs carried, in-flight counted', () => {
  const bufs = [newActivityBuffer(), newActivityBuffer()];
  const reader = new QueueActivityReader(bufs);
  const q0 = new QueueActivityWriter(bufs[0]!, 4);
  const q1 = new QueueActivityWriter(bufs[1]!, 4);
  q0.begin(0, 1000);
  q0.begin(3, 1000.5);
  q1.begin(2, 2000);
  assert.equal(reader.poll(), { ops: 0, bytes: 0, bytesRead: 0, bytesWritten: 0, latencyNs: 0, inFlight: 3 });
  q0.end(0, 1000.25); // 250 µs
  q1.end(2, 2000.0125); // 12.5 µs: 12 published, 0.5 carried
  let t = reader.poll();
  assert.is(t.ops, 2);
  assert.is(t.latencyNs, 262_000);
  assert.is(t.inFlight, 1);
  // 1000 requests of 0.3 µs each: nothing is lost to rounding (300 µs in all, to within 1 µs).
  for (let i = 0; i < 1000; i++) {
    q1.begin(1, 5000);
    q1.end(1, 5000 + 0.0003);
  }
  q0.end(3, 1001.5); // 1 ms
  t = reader.poll();
  assert.is(t.ops, 1003);
  assert.ok(Math.abs(t.latencyNs - (262_000 + 300_000 + 1_000_000 + 500)) <= 1000, `latency ${t.latencyNs}`);
  assert.is(t.inFlight, 0);
  // An end without a begin (cannot happen) is not counted.
  q0.end(1, 9999);
  assert.is(reader.poll().ops, 1003);
});

test('queue activity: the 32-bit counters wrap without the reader losing or gaining anything', () => {
  const buf = newActivityBuffer();
  const raw = new Int32Array(buf);
  raw[0] = -3; // 2^32 − 3 requests, and 2^32 − 100 µs, already counted before the reader
  raw[1] = -100;
  const reader = new QueueActivityReader([buf]);
  const w = new QueueActivityWriter(buf, 1);
  for (let i = 0; i < 5; i++) {
    w.begin(0, 0);
    w.end(0, 0.1); // 100 µs
  }
  const t = reader.poll();
  assert.is(raw[0], 2);
  assert.is(t.ops, 5);
  assert.is(t.latencyNs, 500_000);
});

test('queue activity: bytes read and written counted when requests complete, across queues, through the wrap', () => {
  const bufs = [newActivityBuffer(), newActivityBuffer()];
  const raw = new Int32Array(bufs[1]!);
  raw[3] = -2; // 2^32 − 2 sectors already read on queue 1 before the reader was made
  const reader = new QueueActivityReader(bufs);
  const q0 = new QueueActivityWriter(bufs[0]!, 4);
  const q1 = new QueueActivityWriter(bufs[1]!, 4);
  q0.begin(0, 0, ACTIVITY_READ, 8); // 4 KiB read
  q0.begin(1, 0, ACTIVITY_WRITE, 256); // 128 KiB write
  q1.begin(0, 0, ACTIVITY_READ, 1024); // 512 KiB read: wraps queue 1's counter
  q1.begin(1, 0, ACTIVITY_OTHER, 0); // a flush moves nothing
  let t = reader.poll();
  assert.is(t.bytes, 0, 'nothing counted before completion');
  q0.end(0, 1);
  q0.end(1, 1);
  q1.end(0, 1);
  q1.end(1, 1);
  t = reader.poll();
  assert.is(t.bytesRead, 4096 + 512 * 1024);
  assert.is(t.bytesWritten, 128 * 1024);
  assert.is(t.bytes, t.bytesRead + t.bytesWritten);
  assert.is(raw[3], 1022, 'the 32-bit counter wrapped');
  // The tag is reused for a write: its old direction and size do not leak into the new request.
  q0.begin(0, 2, ACTIVITY_WRITE, 1);
  q0.end(0, 3);
  t = reader.poll();
  assert.is(t.bytesRead, 4096 + 512 * 1024);
  assert.is(t.bytesWritten, 128 * 1024 + 512);
});

test('state files: write, list, remove', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-run-'));
  process.env.FVD_RUN_DIR = dir;
  try {
    const st = { name: 'a', devId: 3, device: '/dev/ublkb3', image: '/x.fvd', pid: 1, size: 1, queues: 2, depth: 128, startedAt: 'now' };
    writeState(st);
    writeState({ ...st, name: 'b', devId: 1, device: '/dev/ublkb1' });
    fs.writeFileSync(path.join(dir, 'ublkb9.json'), '{broken');
    assert.equal(listStates().map((s) => s.name), ['b', 'a']);
    removeState(3);
    assert.equal(listStates().map((s) => s.devId), [1]);
  } finally {
    delete process.env.FVD_RUN_DIR;
    fs.rmSync(dir, { recursive: true });
  }
});

test.run();
