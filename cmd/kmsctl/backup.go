package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/kmsd-project/kmsd/internal/fileutil"
	"github.com/kmsd-project/kmsd/store/backup"
)

var backupCommands = []command{
	{
		name: "backup", synopsis: "--out FILE [--with-blobs=false] [--identity-key-file FILE]",
		help: "take an online backup of everything kmsd holds (an admin token over \"*\"; --timeout bounds the whole transfer): sealed keys, token hashes, the audit log's rows and checkpoint, HE blobs; written to FILE.partial, checked, then renamed to FILE",
		flags: func(fs *flag.FlagSet) {
			fs.String("out", "", "the backup file to write (required; an existing file is not overwritten)")
			fs.Bool("with-blobs", true, "include the HE blobs (public and evaluation keys); false lists their digests only")
			fs.String("identity-key-file", "", "the service's identity public key pinned earlier (kmsctl audit verify --fetch-identity); default: ask kmsd")
		},
		run: runBackup,
	},
	{
		name: "backup verify", synopsis: "FILE [--identity-key-file FILE]", nargs: 1,
		help: "check a backup file offline: complete, unchanged, signed by the identity key it holds (and, with --identity-key-file, that this is the service's key); exit 1 if not. kmsd restore checks too that the key is sealed in your HSM",
		flags: func(fs *flag.FlagSet) {
			fs.String("identity-key-file", "", "the service's identity public key, base64 as GET /v1/identity gives it")
		},
		run: func(e *env, fs *flag.FlagSet, args []string) (int, error) {
			pin, err := pinnedIdentity(fs)
			if err != nil {
				return 0, err
			}
			f, err := checkBackupFile(args[0], pin)
			if err != nil {
				if errors.Is(err, errNotExist) {
					return 0, usageError{err.Error()}
				}
				fmt.Fprintf(e.stderr, "kmsctl: backup NOT valid: %v\n", err)
				return exitInvalid, nil
			}
			return exitOK, e.out(backupReport(args[0], f))
		},
	},
}

func init() { commands = append(commands, backupCommands...) }

// pinnedIdentity reads --identity-key-file (nil if not given).
func pinnedIdentity(fs *flag.FlagSet) ([]byte, error) {
	p := str(fs, "identity-key-file")
	if p == "" {
		return nil, nil
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, usageError{err.Error()}
	}
	return decodeIdentity(b)
}

// checkBackupFile reads a backup through and checks its signature, and
// that the signing key is pin when pin is set.
func checkBackupFile(path string, pin []byte) (*backup.File, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	f, err := backup.Read(fh, backup.Discard{})
	if err != nil {
		return nil, err
	}
	if err := backup.Verify(f); err != nil {
		return nil, err
	}
	if pin != nil && !bytes.Equal(f.Identity[f.Trailer.IdentityVersion].PublicKey, pin) {
		return nil, fmt.Errorf("%w (it is signed by another identity key than the one given)", backup.ErrNotGenuine)
	}
	return f, nil
}

func backupReport(path string, f *backup.File) map[string]any {
	size := int64(0)
	if st, err := os.Stat(path); err == nil {
		size = st.Size()
	}
	return map[string]any{"file": path, "id": f.ID, "bytes": size, "created": f.Header.Created, "store": f.Header.Store,
		"kmsd": f.Header.Kmsd, "identity_version": f.Trailer.IdentityVersion, "summary": f.Summary}
}

// countingWriter counts bytes and reports them, at most every 100 ms.
type countingWriter struct {
	w    io.Writer
	n    int64
	last time.Time
	e    *env
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	if time.Since(c.last) >= 100*time.Millisecond {
		c.last = time.Now()
		fmt.Fprintf(c.e.stderr, "\rbackup: %d MiB received", c.n>>20)
	}
	return n, err
}

func runBackup(e *env, fs *flag.FlagSet, _ []string) (int, error) {
	out := str(fs, "out")
	if out == "" {
		return 0, usageError{"--out is required"}
	}
	if _, err := os.Lstat(out); err == nil {
		return 0, usageError{out + " exists: a backup does not overwrite a file (pick another name)"}
	}
	pin, err := pinnedIdentity(fs)
	if err != nil {
		return 0, err
	}
	if pin == nil {
		id, err := e.c.Identity(e.ctx)
		if err != nil {
			return 0, err
		}
		pin = id.PublicKey
	}
	partial := out + ".partial"
	// A .partial left by a backup that broke off goes; whatever is at
	// the name (a symbolic link planted there, say) is removed, never
	// followed, and the file is made new (O_EXCL does not follow links).
	if err := os.Remove(partial); err != nil && !errors.Is(err, os.ErrNotExist) {
		return 0, usageError{err.Error()}
	}
	fh, err := os.OpenFile(partial, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, usageError{err.Error()}
	}
	cw := &countingWriter{w: fh, e: e}
	id, err := e.c.Backup(e.ctx, cw, boolFlag(fs, "with-blobs"))
	fmt.Fprintf(e.stderr, "\rbackup: %d MiB received\n", cw.n>>20)
	if err == nil {
		err = fh.Sync()
	}
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("backup failed; %s is incomplete and no restore accepts it: %w", partial, err)
	}
	f, err := checkBackupFile(partial, pin)
	if err != nil {
		return exitFailure, fmt.Errorf("the backup received does not check (%s kept for inspection): %w", partial, err)
	}
	if f.ID != id {
		return exitFailure, fmt.Errorf("the backup received is not the one kmsd sent (id %s, kmsd says %s); %s kept for inspection", f.ID, id, partial)
	}
	if err := os.Rename(partial, out); err != nil {
		return 0, usageError{err.Error()}
	}
	if err := fileutil.SyncDir(filepath.Dir(out)); err != nil {
		return 0, usageError{err.Error()}
	}
	return exitOK, e.out(backupReport(out, f))
}
