/**
 * The engine (fvd/) must run with no native code and no package: its sources may import only
 * node: built-ins and other files inside fvd/. Storage backends that need koffi (storage/) implement
 * fvd/io.ts's IoBackend and are passed in by the caller. This test reads the TypeScript sources
 * (not the compiled output, where type-only imports have vanished) and checks every module
 * reference: import/export ... from, import('...'), require('...'), import x = require('...') and
 * import('...') types. A computed specifier cannot be checked, so it fails too.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

// build/tests/fvd/engine-imports.test.js -> the repository's fvd/
const testsDir = path.dirname(fileURLToPath(import.meta.url));
const engineDir = path.resolve(testsDir, '..', '..', '..', 'fvd');

function engineSources(dir: string): string[] {
  const files: string[] = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) files.push(...engineSources(full));
    else if (entry.name.endsWith('.ts')) files.push(full);
  }
  return files.sort();
}

/** Every module reference in one source file: a specifier, or null where it is not a literal. */
function moduleReferences(file: string): { specifier: string | null; line: number }[] {
  const source = ts.createSourceFile(file, fs.readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true);
  const found: { specifier: string | null; line: number }[] = [];
  const note = (node: ts.Node, expr: ts.Node | undefined) => {
    const specifier = expr && ts.isStringLiteralLike(expr) ? expr.text : null;
    found.push({ specifier, line: source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1 });
  };
  const visit = (node: ts.Node): void => {
    if (ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) {
      if (node.moduleSpecifier) note(node, node.moduleSpecifier);
    } else if (ts.isImportEqualsDeclaration(node) && ts.isExternalModuleReference(node.moduleReference)) {
      note(node, node.moduleReference.expression);
    } else if (ts.isCallExpression(node)) {
      const callee = node.expression;
      const isImport = callee.kind === ts.SyntaxKind.ImportKeyword;
      const isRequire = ts.isIdentifier(callee) && (callee.text === 'require' || callee.text === 'createRequire');
      if (isImport || isRequire) note(node, node.arguments[0]);
    } else if (ts.isImportTypeNode(node)) {
      const arg = node.argument;
      note(node, ts.isLiteralTypeNode(arg) ? arg.literal : undefined);
    }
    ts.forEachChild(node, visit);
  };
  visit(source);
  return found;
}

/** Why `specifier` (imported from `file`) is not allowed in the engine, or null when it is. */
function violation(file: string, specifier: string | null): string | null {
  if (specifier === null) return 'a computed module specifier';
  if (specifier.startsWith('node:')) return null;
  if (specifier.startsWith('./') || specifier.startsWith('../')) {
    const target = path.resolve(path.dirname(file), specifier);
    const inside = path.relative(engineDir, target);
    if (inside !== '' && !inside.startsWith('..') && !path.isAbsolute(inside)) return null;
    return `'${specifier}' leaves fvd/`;
  }
  return `'${specifier}' is a package or bare built-in (use node:...)`;
}

test('fvd/ sources exist where the test looks for them', () => {
  const files = engineSources(engineDir);
  assert.ok(files.some((f) => path.basename(f) === 'image.ts'), `no fvd/image.ts under ${engineDir}`);
  assert.ok(files.some((f) => path.basename(f) === 'io.ts'), `no fvd/io.ts under ${engineDir}`);
});

test('the engine imports only node: built-ins and files inside fvd/', () => {
  const problems: string[] = [];
  let references = 0;
  for (const file of engineSources(engineDir)) {
    for (const ref of moduleReferences(file)) {
      references++;
      const why = violation(file, ref.specifier);
      if (why) problems.push(`fvd/${path.relative(engineDir, file)}:${ref.line}: ${why}`);
    }
  }
  assert.ok(references > 20, `only ${references} module references found: is the scanner reading the sources?`);
  assert.equal(problems, [], `the engine must not depend on anything outside fvd/ or node:\n${problems.join('\n')}`);
});

test('the checker itself: what it refuses and what it allows', () => {
  const file = path.join(engineDir, 'image.ts');
  assert.is(violation(file, 'node:fs'), null);
  assert.is(violation(file, './io.js'), null);
  assert.ok(violation(file, '../ffi/libc.js'), 'a sibling directory');
  assert.ok(violation(file, '../storage/node-file.js'), 'the storage backends');
  assert.ok(violation(file, './../ffi/libc.js'), 'out and back in through ./..');
  assert.ok(violation(file, 'koffi'), 'a package');
  assert.ok(violation(file, 'fs'), 'a bare built-in');
  assert.ok(violation(file, null), 'a computed specifier');
  // The scanner sees every form, including ones tsc would drop from the output.
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-engine-imports-'));
  try {
    const sample = path.join(tmp, 'sample.ts');
    fs.writeFileSync(
      sample,
      [
        "import type { A } from 'a-type';",
        "export { b } from 'b-reexport';",
        "export * from 'c-star';",
        "const d = await import('d-dynamic');",
        "const e = require('e-require');",
        "import f = require('f-equals');",
        "let g: import('g-type').G;",
        'const h = await import(name);',
        "// import x from 'comment-only';",
        "const s = \"import y from 'string-only'\";",
      ].join('\n'),
    );
    const specifiers = moduleReferences(sample).map((r) => r.specifier);
    assert.equal(specifiers, ['a-type', 'b-reexport', 'c-star', 'd-dynamic', 'e-require', 'f-equals', 'g-type', null]);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

test.run();
