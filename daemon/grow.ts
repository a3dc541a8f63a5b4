/**
 * The storage grow command of an image on a block device (`fvd serve --grow-cmd`, GROW_CMD= in
 * /etc/fvd/NAME.conf), like FVD's add_storage_cmd: e.g. `lvextend -L+1G %s`, run by /bin/sh with
 * %s replaced by the image's path (shell-quoted) when free space past the last chunk runs low
 * (fvd/image.ts StorageGrower). Its output and exit status go to the daemon's log.
 */
import { execFile } from 'node:child_process';

const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

export function growCommand(template: string, image: string): string {
  return template.includes('%s') ? template.replace(/%s/g, quote(image)) : `${template} ${quote(image)}`;
}

export function runGrowCommand(template: string, image: string, log: (line: string) => void, timeoutMs = 300_000): Promise<void> {
  const cmd = growCommand(template, image);
  log(`storage low: running the grow command: ${cmd}`);
  return new Promise((resolve, reject) => {
    execFile('/bin/sh', ['-c', cmd], { timeout: timeoutMs }, (err, stdout, stderr) => {
      const out = `${stdout}${stderr}`.trim().replace(/\s*\n\s*/g, ' | ');
      if (err) {
        log(`grow command failed (${err.code ?? err.signal ?? err.message})${out ? `: ${out}` : ''}`);
        reject(err);
      } else {
        log(`grow command done${out ? `: ${out}` : ''}`);
        resolve();
      }
    });
  });
}
