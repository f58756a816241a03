package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	iofs "io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/he/s3blobs"
	"github.com/kmsd-project/kmsd/internal/fileutil"
	"github.com/kmsd-project/kmsd/internal/s3conn"
	"github.com/kmsd-project/kmsd/store/archive"
)

// auditCommands verify and export the audit log.
var auditCommands = []command{
	{
		name:     "audit verify",
		synopsis: "--identity-key-file FILE [--fetch-identity] [--export DIR | --archive DIR|s3://BUCKET/PREFIX/|kmsd [--s3-endpoint URL]] [--saved-checkpoint FILE] [--save-checkpoint FILE]",
		help:     "check the audit log's signatures, tree, inclusion and consistency; exit 0 if intact, 1 if not (naming the first record, tile or bundle that does not match)",
		flags: func(fs *flag.FlagSet) {
			fs.String("identity-key-file", "", "the service's identity public key, base64 as GET /v1/identity gives it (required)")
			fs.Bool("fetch-identity", false, "if the identity key file does not exist, fetch the key from the server once and pin it there")
			fs.String("export", "", "verify an export made by 'audit export' instead of the live server")
			fs.String("archive", "", "verify the audit archive (a tlog-tiles log: kmsd --audit-archive) instead: a directory, s3://BUCKET/PREFIX/ (with --s3-endpoint and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), or kmsd for the tiles kmsd serves")
			fs.String("s3-endpoint", "", "with --archive s3://...: the S3-compatible server, https://host[:port]")
			fs.String("saved-checkpoint", "", "a checkpoint saved earlier: the log must extend it (no rollback, no fork)")
			fs.String("save-checkpoint", "", "after a good verification, save the latest checkpoint here for next time (and, beside it as FILE.restores, the restores the log held, so that a rollback is told apart from a restore made since)")
		},
		run: auditVerify,
	},
	{
		name:     "audit export",
		synopsis: "--out DIR [--archive DIR|s3://BUCKET/PREFIX/|kmsd [--s3-endpoint URL]] [--start N] [--end M]",
		help:     "write the records covered by the latest checkpoint and the checkpoint to DIR (an older checkpoint there is kept as checkpoint.<size>); with --archive, those of the audit archive, read straight from it",
		flags: func(fs *flag.FlagSet) {
			fs.String("out", "", "directory to write (required)")
			fs.String("archive", "", "export the audit archive (kmsd --audit-archive) instead of the live log: a directory, s3://BUCKET/PREFIX/ (with --s3-endpoint and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), or kmsd for the tiles kmsd serves")
			fs.String("s3-endpoint", "", "with --archive s3://...: the S3-compatible server, https://host[:port]")
			fs.Uint64("start", 0, "export records from this index on (default 0)")
			fs.Uint64("end", 0, "export records below this index (default: all the checkpoint covers); a range that does not start at 0 is for reading: audit verify --export checks whole exports")
		},
		run: auditExport,
	},
}

func init() { commands = append(commands, auditCommands...) }

// checkpointSize reads the size line of a signed checkpoint without
// verifying it (verification comes later, with the pinned key).
func checkpointSize(note []byte) (uint64, error) {
	text, _, ok := bytes.Cut(note, []byte("\n\n"))
	if !ok {
		return 0, errors.New("the server's checkpoint is not a signed note")
	}
	c, err := audit.ParseCheckpoint(string(text) + "\n")
	return c.Size, err
}

func auditExport(e *env, fs *flag.FlagSet, _ []string) (int, error) {
	out := str(fs, "out")
	if out == "" {
		return 0, usageError{"--out is required"}
	}
	var cp []byte
	var recs [][]byte
	var size uint64
	var err error
	start, _ := fs.Lookup("start").Value.(flag.Getter).Get().(uint64)
	end, _ := fs.Lookup("end").Value.(flag.Getter).Get().(uint64)
	// rng bounds the export to [start, end) within the checkpoint's size.
	rng := func() (uint64, uint64, error) {
		e := end
		if e == 0 {
			e = size
		}
		if start > e || e > size {
			return 0, 0, usageError{fmt.Sprintf("--start %d --end %d: the checkpoint covers records [0, %d)", start, e, size)}
		}
		return start, e, nil
	}
	if where := str(fs, "archive"); where != "" {
		b, err := archiveBucket(e, fs, where)
		if err != nil {
			return 0, err
		}
		if cp, err = b.Get(e.ctx, layout.CheckpointPath); err != nil {
			return 0, fmt.Errorf("%s: %w", layout.CheckpointPath, err)
		}
		if size, err = checkpointSize(cp); err != nil {
			return exitFailure, err
		}
		from, to, err := rng()
		if err != nil {
			return 0, err
		}
		if recs, err = (&archive.Cold{Bucket: b}).ColdRecords(e.ctx, from, to); err != nil {
			return exitFailure, err
		}
	} else {
		if cp, err = e.c.AuditCheckpoint(e.ctx); err != nil {
			return 0, err
		}
		if size, err = checkpointSize(cp); err != nil {
			return exitFailure, err
		}
		from, to, err := rng()
		if err != nil {
			return 0, err
		}
		if recs, err = e.c.AuditRecords(e.ctx, from, to); err != nil {
			return 0, err
		}
	}
	if err := os.MkdirAll(out, 0o700); err != nil {
		return 0, usageError{err.Error()}
	}
	if old, err := os.ReadFile(filepath.Join(out, "checkpoint")); err == nil {
		if n, err := checkpointSize(old); err == nil {
			if err := fileutil.WriteAtomic(filepath.Join(out, fmt.Sprintf("checkpoint.%d", n)), old, 0o600); err != nil {
				return 0, usageError{err.Error()}
			}
		}
	}
	var buf bytes.Buffer
	for _, r := range recs {
		buf.Write(r)
		buf.WriteByte('\n')
	}
	if err := fileutil.WriteAtomic(filepath.Join(out, "records.jsonl"), buf.Bytes(), 0o600); err != nil {
		return 0, usageError{err.Error()}
	}
	if err := fileutil.WriteAtomic(filepath.Join(out, "checkpoint"), cp, 0o600); err != nil {
		return 0, usageError{err.Error()}
	}
	fmt.Fprintf(e.stdout, "exported %d records (from index %d) and the checkpoint of size %d to %s\n", len(recs), start, size, out)
	return exitOK, nil
}

func readIdentity(e *env, fs *flag.FlagSet) ([]byte, error) {
	path := str(fs, "identity-key-file")
	if path == "" {
		return nil, usageError{"--identity-key-file is required"}
	}
	b, err := os.ReadFile(path)
	fetch, _ := fs.Lookup("fetch-identity").Value.(flag.Getter).Get().(bool)
	if errors.Is(err, errNotExist) && fetch {
		id, err := e.c.Identity(e.ctx)
		if err != nil {
			return nil, err
		}
		if err := fileutil.WriteAtomic(path, []byte(base64.StdEncoding.EncodeToString(id.PublicKey)+"\n"), 0o644); err != nil {
			return nil, usageError{err.Error()}
		}
		fmt.Fprintf(e.stdout, "pinned the identity key (version %d) in %s\n", id.Version, path)
		return id.PublicKey, nil
	}
	if err != nil {
		return nil, usageError{err.Error()}
	}
	return decodeIdentity(b)
}

// readIdentityFile reads a pinned identity public key (base64, as GET
// /v1/identity gives it).
func readIdentityFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, usageError{err.Error()}
	}
	return decodeIdentity(b)
}

func decodeIdentity(b []byte) ([]byte, error) {
	pub, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, usageError{"the identity key file does not hold standard base64"}
	}
	return pub, nil
}

var errNotExist = iofs.ErrNotExist

// notIntact reports a failed verification: one line, exit 1.
func notIntact(e *env, err error) (int, error) {
	fmt.Fprintf(e.stdout, "audit log NOT intact: %v\n", err)
	return exitInvalid, nil
}

func auditVerify(e *env, fs *flag.FlagSet, _ []string) (int, error) {
	pub, err := readIdentity(e, fs)
	if err != nil {
		return 0, err
	}
	var saved []byte
	var state *audit.SavedState
	if p := str(fs, "saved-checkpoint"); p != "" {
		if saved, err = os.ReadFile(p); err != nil {
			return 0, usageError{err.Error()}
		}
		// The restores the log held when the checkpoint was saved: a
		// rollback is told apart from a restore made since.
		if b, err := os.ReadFile(p + ".restores"); err == nil {
			state = &audit.SavedState{}
			if err := json.Unmarshal(b, state); err != nil {
				return 0, usageError{fmt.Sprintf("%s.restores: %v", p, err)}
			}
		} else if !errors.Is(err, errNotExist) {
			return 0, usageError{err.Error()}
		}
	}
	if a := str(fs, "archive"); a != "" {
		if str(fs, "export") != "" {
			return 0, usageError{"--archive and --export: give one"}
		}
		return verifyArchive(e, fs, a, pub, saved)
	}
	var records, checkpoints [][]byte
	live := str(fs, "export") == ""
	if !live {
		dir := str(fs, "export")
		b, err := os.ReadFile(filepath.Join(dir, "records.jsonl"))
		if err != nil {
			return 0, usageError{err.Error()}
		}
		if len(b) > 0 {
			if b[len(b)-1] != '\n' {
				return notIntact(e, errors.New("truncated check failed: records.jsonl does not end in a newline"))
			}
			records = bytes.Split(b[:len(b)-1], []byte("\n"))
		}
		names, _ := filepath.Glob(filepath.Join(dir, "checkpoint*"))
		sort.Strings(names)
		for _, n := range names {
			cp, err := os.ReadFile(n)
			if err != nil {
				return 0, usageError{err.Error()}
			}
			checkpoints = append(checkpoints, cp)
		}
		if len(checkpoints) == 0 {
			return 0, usageError{"the export has no checkpoint"}
		}
	} else {
		cp, err := e.c.AuditCheckpoint(e.ctx)
		if err != nil {
			return 0, err
		}
		size, err := checkpointSize(cp)
		if err != nil {
			return notIntact(e, err)
		}
		if records, err = e.c.AuditRecords(e.ctx, 0, size); err != nil {
			return 0, err
		}
		checkpoints = [][]byte{cp}
	}
	res, tree, err := audit.VerifySaved(pub, records, checkpoints, saved, state)
	if err != nil {
		return notIntact(e, err)
	}
	if live {
		// The server's proofs must agree with what was recomputed.
		if saved != nil {
			old, _ := audit.OpenCheckpoint(saved, pub)
			if old.Size > 0 && old.Size < res.Size {
				p, err := e.c.ConsistencyProof(e.ctx, old.Size, res.Size)
				if err != nil {
					return 0, err
				}
				if err := tlog.CheckTree(proofHashes(p.Proof), int64(res.Size), res.Root, int64(old.Size), old.Root); err != nil {
					return notIntact(e, &audit.Problem{Check: "proof", Index: -1, Msg: fmt.Sprintf("the server's consistency proof from size %d does not check: %v", old.Size, err)})
				}
			}
		}
		for _, i := range sample(res.Size, 16) {
			p, err := e.c.InclusionProof(e.ctx, i, res.Size)
			if err != nil {
				return 0, err
			}
			if err := tlog.CheckRecord(proofHashes(p.Proof), int64(res.Size), res.Root, int64(i), tree.Leaf(i)); err != nil {
				return notIntact(e, &audit.Problem{Check: "proof", Index: int64(i), Msg: fmt.Sprintf("the server's inclusion proof does not check: %v", err)})
			}
		}
	}
	if p := str(fs, "save-checkpoint"); p != "" {
		b, _ := json.Marshal(audit.StateOf(records[:res.Size]))
		if err := fileutil.WriteAtomic(p+".restores", append(b, '\n'), 0o600); err != nil {
			return 0, usageError{err.Error()}
		}
		if err := fileutil.WriteAtomic(p, checkpoints[len(checkpoints)-1], 0o600); err != nil {
			return 0, usageError{err.Error()}
		}
	}
	fmt.Fprintln(e.stdout, res.String())
	return exitOK, nil
}

// verifyArchive checks an audit archive (archive.Verify) in a directory,
// an S3 bucket, or as kmsd serves it.
func verifyArchive(e *env, fs *flag.FlagSet, where string, pub, saved []byte) (int, error) {
	b, err := archiveBucket(e, fs, where)
	if err != nil {
		return 0, err
	}
	res, err := archive.Verify(e.ctx, b, pub, saved)
	if err != nil {
		return notIntact(e, err)
	}
	if p := str(fs, "save-checkpoint"); p != "" {
		note, err := b.Get(e.ctx, layout.CheckpointPath)
		if err != nil {
			return 0, err
		}
		// Read again: saved only if it is the checkpoint just verified
		// (the archive may have changed since).
		if c, err := audit.OpenCheckpoint(note, pub); err != nil || c.Size != res.Size || c.Root != res.Root {
			return notIntact(e, fmt.Errorf("%s changed during the verification: not saved", layout.CheckpointPath))
		}
		if err := fileutil.WriteAtomic(p, note, 0o600); err != nil {
			return 0, usageError{err.Error()}
		}
	}
	fmt.Fprintln(e.stdout, strings.Replace(res.String(), "audit log intact", "audit archive intact ("+b.String()+")", 1))
	return exitOK, nil
}

// archiveBucket opens --archive: a directory, an S3 bucket, or kmsd's
// /v1/audit/tiles/.
func archiveBucket(e *env, fs *flag.FlagSet, where string) (archive.Bucket, error) {
	switch {
	case where == "kmsd":
		return tileClient{e}, nil
	case strings.HasPrefix(where, "s3://"):
		bucket, prefix, _ := strings.Cut(strings.TrimPrefix(where, "s3://"), "/")
		endpoint := str(fs, "s3-endpoint")
		if endpoint == "" {
			return nil, usageError{"--archive s3://... needs --s3-endpoint"}
		}
		if _, err := s3blobs.CheckEndpoint(endpoint); err != nil {
			return nil, usageError{"--s3-endpoint: " + err.Error()}
		}
		return archive.OpenS3(e.ctx, archive.S3Config{Bucket: bucket, Prefix: prefix, Config: s3conn.Config{Endpoint: endpoint,
			AccessKeyID: e.getenv("AWS_ACCESS_KEY_ID"), SecretAccessKey: e.getenv("AWS_SECRET_ACCESS_KEY"), SessionToken: e.getenv("AWS_SESSION_TOKEN")}})
	}
	if fi, err := os.Stat(where); err != nil || !fi.IsDir() {
		return nil, usageError{fmt.Sprintf("--archive %s: not a directory (or s3://BUCKET/PREFIX/, or kmsd)", where)}
	}
	return archive.Dir{Root: where}, nil
}

// tileClient reads the archive through kmsd's /v1/audit/tiles/.
type tileClient struct{ e *env }

func (t tileClient) Get(ctx context.Context, path string) ([]byte, error) {
	return t.e.c.AuditTile(ctx, path)
}
func (t tileClient) Put(context.Context, string, []byte, bool) error {
	return errors.New("read-only")
}
func (t tileClient) String() string { return "kmsd's /v1/audit/tiles/" }

// sample picks up to n indexes spread over [0, size), first and last included.
func sample(size uint64, n uint64) []uint64 {
	if size == 0 {
		return nil
	}
	if size <= n {
		out := make([]uint64, size)
		for i := range out {
			out[i] = uint64(i)
		}
		return out
	}
	out := make([]uint64, n)
	for i := uint64(0); i < n; i++ {
		out[i] = i * (size - 1) / (n - 1)
	}
	return out
}

func proofHashes(p [][]byte) []tlog.Hash {
	out := make([]tlog.Hash, len(p))
	for i := range p {
		copy(out[i][:], p[i])
	}
	return out
}
