package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/archive"
	"github.com/kmsd-project/kmsd/store/backup"
)

const restoreUsageHead = `kmsd restore: fill an empty store from a backup (kmsctl backup).

Usage:
  kmsd restore --from FILE [--identity-key-file FILE] [kmsd's flags]

--identity-key-file pins the service's identity key (base64, as
kmsctl audit verify --fetch-identity saved it): a backup signed by
another is refused, even one sealed in the same token.

It takes kmsd's own flags: --data-dir or --store etcd with --etcd-*, the
PKCS#11 flags of the HSM the backup was sealed under (with the embedded
SoftHSM: the data dir's softhsm/ directory, kept beside the backup), the
S3 flags for HE blobs, and --audit-archive. The target must hold no store
(no kms.db; an etcd prefix holding nothing). The backup is checked first:
complete, unchanged, signed by an identity key sealed under this HSM's
KEK. Then the store is written all or nothing, the audit log is read back
from the archive up to its newest checkpoint when one is given, and a
"restore" record is appended. It prints what it restored as JSON.
`

// splitRestore takes restore's own flags out of args: --from FILE and
// --identity-key-file FILE (each also as --flag=value).
func splitRestore(args []string) (from, pin string, rest []string, err error) {
	own := map[string]*string{"from": &from, "identity-key-file": &pin}
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		dst, ok := own[name]
		if !ok || !strings.HasPrefix(a, "-") {
			rest = append(rest, a)
			continue
		}
		if !hasValue {
			if i+1 >= len(args) {
				return "", "", nil, fmt.Errorf("--%s needs a file", name)
			}
			value = args[i+1]
			i++
		}
		*dst = value
	}
	return from, pin, rest, nil
}

// errRestoreHelp is restore's answer to --help.
var errRestoreHelp = errors.New("restore help")

// restoreResult is what kmsd restore prints.
type restoreResult struct {
	Backup      string         `json:"backup"` // its id
	Created     string         `json:"created"`
	From        string         `json:"from_store"`
	Into        string         `json:"into_store"`
	Summary     backup.Summary `json:"summary"`
	AuditSize   uint64         `json:"audit_size"` // the log's size after the restore record
	ArchiveSize uint64         `json:"archive_size,omitempty"`
	// LostChanges lists (up to 100) the state changes the archive holds
	// that happened after the backup: the restored store does not have
	// them. Re-apply those that matter (a token revoked, a version
	// disabled) before clients come back.
	LostChanges []string `json:"lost_changes,omitempty"`
	Took        string   `json:"took"`
}

func runRestore(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	start := time.Now()
	from, pinFile, rest, err := splitRestore(args)
	if err != nil {
		return err
	}
	c, err := parseFlags(rest, getenv)
	if errors.Is(err, flag.ErrHelp) {
		return errRestoreHelp
	}
	if err != nil {
		return err
	}
	if from == "" {
		return errors.New("kmsd restore needs --from FILE, a backup kmsctl backup wrote")
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	if err := checkBeforeDisk(c, getenv, false); err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
	if err := pqc.SelfTest(); err != nil {
		return err
	}

	// 1. The file, read through: complete, unchanged, signed.
	fh, err := os.Open(from)
	if err != nil {
		return fmt.Errorf("--from: %w", err)
	}
	defer fh.Close()
	meta := &metaCatcher{KEKs: backup.KEKs{BlobKEK: hsm.BlobKEK}}
	f, err := backup.Read(fh, meta)
	if err != nil {
		return fmt.Errorf("%s: %w; nothing was changed", from, err)
	}
	if err := backup.Verify(f); err != nil {
		return fmt.Errorf("%s: %w; nothing was changed", from, err)
	}
	if pinFile != "" {
		// The service's identity key pinned: another deployment's backup
		// (sealed in the same token) is refused too.
		b, err := os.ReadFile(pinFile)
		if err != nil {
			return fmt.Errorf("--identity-key-file: %w", err)
		}
		pub, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
		if err != nil {
			return fmt.Errorf("--identity-key-file: not base64: %w", err)
		}
		if !bytes.Equal(pub, f.Identity[f.Trailer.IdentityVersion].PublicKey) {
			return fmt.Errorf("%s is signed by another identity key than --identity-key-file's (another deployment's backup?); nothing was changed", from)
		}
	}
	sealedUnder, err := parseKEKRef(meta.sealedUnder)
	if err != nil {
		return err
	}
	if sealedUnder == nil {
		return fmt.Errorf("%s holds no record of the KEK it was sealed under; nothing was changed", from)
	}
	if sealedUnder.Token != c.token || sealedUnder.Label != c.kekLabel {
		return fmt.Errorf("the backup was sealed under the key labelled %q in token %q (KEK id %s), but kmsd restore was given --pkcs11-token %q --kek-label %q: give those; nothing was changed", sealedUnder.Label, sealedUnder.Token, sealedUnder.ID, c.token, c.kekLabel)
	}
	if f.Summary.Blobs > 0 && c.store == "etcd" && c.s3Endpoint == "" {
		return errors.New("the backup holds HE blobs and --store etcd keeps them in S3 only: give --s3-endpoint and --s3-bucket; nothing was changed")
	}

	// 2. The target: it must hold no store.
	if err := os.MkdirAll(c.dataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	conn, err := connectStore(c, log)
	if err != nil {
		return err
	}
	defer conn.Close()
	loader, ok := conn.(store.Loader)
	if !ok {
		return fmt.Errorf("store %s takes no restore", c.store)
	}
	if c.store != "etcd" {
		if _, err := os.Lstat(filepath.Join(c.dataDir, "kms.db")); err == nil {
			return fmt.Errorf("%s already holds a kms.db: kmsd restore fills an empty data dir (move kms.db away first); nothing was changed", c.dataDir)
		}
	} else if peeked, empty, err := conn.Peek("sealed-under"); err != nil && !strings.Contains(err.Error(), "restore into this etcd prefix did not finish") {
		return err
	} else if err == nil && (!empty || peeked != nil) {
		return fmt.Errorf("etcd prefix %s already holds a store: kmsd restore fills an empty prefix; nothing was changed", c.etcdPrefix)
	}

	// 3. The HSM, and proof that the backup's identity key is sealed
	// under its KEK.
	sealer, err := openSealer(c, sealedUnder, false, log, getenv)
	if errors.Is(err, hsm.ErrKEKMissing) {
		return fmt.Errorf("the backup is sealed under KEK %s, which the HSM does not hold (retired since, or another HSM: a backup sealed under a retired KEK no longer restores); nothing was changed", sealedUnder.ID)
	}
	if err != nil {
		return fmt.Errorf("%w; nothing was changed", err)
	}
	defer sealer.Close()
	if sealedUnder.ID != sealer.KEKID() {
		return fmt.Errorf("HSM: the key labelled %q has id %s, but the backup was sealed under the KEK with id %s; nothing was changed", c.kekLabel, sealer.KEKID(), sealedUnder.ID)
	}
	if err := backup.BindHSM(ctx, sealer, f); err != nil {
		return fmt.Errorf("%s: %w; nothing was changed", from, err)
	}
	if err := meta.CheckKEKs(sealer.HasKEK); err != nil {
		return fmt.Errorf("%s: %w; nothing was changed", from, err)
	}

	// 4. The blobs and the store, from a second read that must be the
	// same file.
	var blobs he.Blobs
	if f.Summary.Blobs > 0 {
		if b, err := openBlobs(ctx, c, getenv); err != nil {
			return err
		} else if b != nil {
			blobs = b
		} else if blobs, err = he.OpenDirBlobs(filepath.Join(c.dataDir, "blobs")); err != nil {
			return err
		}
	}
	res := restoreResult{Backup: f.ID, Created: f.Header.Created, From: f.Header.Store, Into: c.store, Summary: f.Summary}
	identity := f.Identity[f.Trailer.IdentityVersion].PublicKey
	arch, err := openArchive(ctx, c, getenv)
	if err != nil {
		return err
	}
	feed := func(sink store.Sink) error {
		if _, err := fh.Seek(0, io.SeekStart); err != nil {
			return err
		}
		again, err := backup.Read(fh, &restoreHandler{Sink: sink, blobs: blobs, ctx: ctx})
		if err != nil {
			return err
		}
		if again.ID != f.ID {
			return fmt.Errorf("%s changed while it was restored", from)
		}
		if blobs != nil {
			return blobs.Sync(ctx)
		}
		return nil
	}
	// 5. Before the store can be started on: the audit log read back
	// from the archive, the restore record, the revocations made after
	// the backup made again. A restore killed or failing before this
	// ends leaves no store kmsd starts on.
	finish := func(st store.Backend) error {
		var revoked []*kms.AuditRecord
		if arch != nil {
			var err error
			if res.ArchiveSize, res.LostChanges, revoked, err = resumeFromArchive(ctx, st, arch, identity, log); err != nil {
				return fmt.Errorf("the audit log could not be read back from the archive %s: %w (kmsd does not archive onto an archive that is ahead of its log: fix the archive, or its flag)", arch, err)
			}
		}
		rec := &kms.AuditRecord{Time: time.Now().UTC().Format(time.RFC3339Nano), Actor: "system", Operation: kms.RestoreOp, Status: 200,
			Restore: &kms.RestoreInfo{Backup: f.ID, BackupSize: f.Summary.AuditSize, ArchiveSize: res.ArchiveSize, Created: f.Header.Created}}
		if err := st.Audit().AppendAudit(ctx, rec); err != nil {
			return fmt.Errorf("append the restore record: %w", err)
		}
		// A token revoked after the backup stays revoked: the restore
		// must not bring a credential back to life.
		for _, r := range revoked {
			at, err := time.Parse(time.RFC3339Nano, r.Time)
			if err != nil {
				at = time.Now().UTC()
			}
			err = st.UpdateToken(ctx, r.Token, func(t *kms.Token) ([]*kms.AuditRecord, error) {
				if t.RevokedAt != nil {
					return nil, errAlreadyRevoked
				}
				t.RevokedAt = &at
				return []*kms.AuditRecord{{Time: time.Now().UTC().Format(time.RFC3339Nano), Actor: "system", Operation: "revoke token revoked after the backup (restore)", Token: r.Token, Status: 200}}, nil
			})
			switch {
			case err == nil:
				log.Warn("restore: revoked again a token the archive says was revoked after the backup", "token", r.Token, "revoked_at", r.Time)
			case errors.Is(err, errAlreadyRevoked), errors.Is(err, kms.ErrNotFound):
			default:
				return fmt.Errorf("revoke again token %s (revoked after the backup): %w", r.Token, err)
			}
		}
		var err error
		res.AuditSize, err = st.Audit().AuditSize(ctx)
		return err
	}
	if err := loader.Load(ctx, sealer, feed, finish); err != nil {
		return fmt.Errorf("restore: %w; the target holds no store kmsd starts on: run kmsd restore again once the cause is fixed", err)
	}
	log.Info("store restored", "backup", f.ID, "keys", f.Summary.Keys, "versions", f.Summary.Versions, "tokens", f.Summary.Tokens, "audit_size", res.AuditSize, "blobs", f.Summary.Blobs)
	res.Took = time.Since(start).Round(time.Millisecond).String()
	b, _ := json.MarshalIndent(res, "", "  ")
	_, err = fmt.Fprintln(stdout, string(b))
	return err
}

// resumeFromArchive makes the restored log the archive's, up to its
// newest checkpoint: the archive must hold the same log (its tree at the
// backup's size has the backup's root), and its records past the backup
// are appended as they are. It returns the archive's size, the state
// changes among those records, and the records of token revocations.
func resumeFromArchive(ctx context.Context, st store.Backend, arch archive.Bucket, identity []byte, log *slog.Logger) (uint64, []string, []*kms.AuditRecord, error) {
	note, err := arch.Get(ctx, layout.CheckpointPath)
	if errors.Is(err, kms.ErrNotFound) {
		return 0, nil, nil, nil
	}
	if err != nil {
		return 0, nil, nil, err
	}
	cp, err := audit.OpenCheckpoint(note, identity)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("its checkpoint is not signed by this service's identity key: %w", err)
	}
	l := st.Audit()
	n, err := l.AuditSize(ctx)
	if err != nil {
		return 0, nil, nil, err
	}
	cold := &archive.Cold{Bucket: arch}
	m := cp.Size
	at := min(m, n)
	if at == 0 {
		return m, nil, nil, nil
	}
	theirs, err := cold.TreeRoot(ctx, at)
	if err != nil {
		return 0, nil, nil, err
	}
	ours, err := l.TrustedRoot(ctx, at)
	if err != nil {
		return 0, nil, nil, err
	}
	if ours != theirs {
		return 0, nil, nil, fmt.Errorf("the archive holds another log: its tree of %d records is not the backup's", at)
	}
	if m <= n {
		return m, nil, nil, nil
	}
	var lost []string
	var revoked []*kms.AuditRecord
	const batch = 4096
	for i := n; i < m; i += batch {
		recs, err := cold.ColdRecords(ctx, i, min(i+batch, m))
		if err != nil {
			return 0, nil, nil, err
		}
		for _, b := range recs {
			r, err := kms.DecodeAuditRecord(b)
			if err == nil && r.Status >= 200 && r.Status < 300 && r.Operation == "DELETE /v1/tokens/{id}" && r.Token != "" {
				revoked = append(revoked, r)
			}
			if err == nil && r.Status >= 200 && r.Status < 300 && changes(r) && len(lost) < 100 {
				what := r.Operation
				if r.Key != "" {
					what += " key=" + r.Key
				}
				if r.Version != 0 {
					what += fmt.Sprintf(" version=%d", r.Version)
				}
				if r.Token != "" {
					what += " token=" + r.Token
				}
				lost = append(lost, fmt.Sprintf("#%d %s %s", r.Index, r.Time, what))
			}
		}
		if err := l.Continue(ctx, recs); err != nil {
			return 0, nil, nil, err
		}
	}
	root, err := l.TrustedRoot(ctx, m)
	if err != nil {
		return 0, nil, nil, err
	}
	if root != cp.Root {
		return 0, nil, nil, errors.New("the log read back from the archive does not hash to the archive's checkpoint")
	}
	log.Warn("audit log read back from the archive past the backup: the changes it records after the backup are not in the restored store", "backup_size", n, "archive_size", m, "state_changes", len(lost))
	return m, lost, revoked, nil
}

var errAlreadyRevoked = errors.New("already revoked")

// changes reports whether a record is of a state change (what a restore
// from an older backup undoes): an API request other than a read, or the
// service's own work.
func changes(r *kms.AuditRecord) bool {
	method, path, ok := strings.Cut(r.Operation, " ")
	if !ok || !strings.HasPrefix(path, "/") {
		return r.Actor == "system"
	}
	switch method {
	case "PATCH", "PUT", "DELETE":
		return true
	case "POST":
		for _, read := range []string{"/sign", "/verify", "/decapsulate", "/decrypt", "/introspect", "/attest"} {
			if strings.HasSuffix(path, read) {
				return false
			}
		}
		return true
	}
	return false
}

// metaCatcher checks a file and keeps the KEK record it holds and the
// KEKs its secrets are sealed under.
type metaCatcher struct {
	backup.KEKs
	sealedUnder []byte
}

func (m *metaCatcher) Meta(name string, value []byte) error {
	if name == "sealed-under" {
		m.sealedUnder = value
	}
	return nil
}

// restoreHandler sends the store's content to the loader and the blobs
// to the blob store, each checked against its digest before it is
// committed.
type restoreHandler struct {
	store.Sink
	blobs he.Blobs
	ctx   context.Context
}

func (h *restoreHandler) Blob(d [32]byte, size int64, r io.Reader) error {
	if h.blobs == nil {
		return errors.New("the backup holds HE blobs and no blob store was given")
	}
	staged, err := h.blobs.Stage(func(w io.Writer) error {
		_, err := io.Copy(w, r)
		return err
	})
	if err != nil {
		return err
	}
	if staged.Digest != he.Digest("sha256:"+hex.EncodeToString(d[:])) || staged.Size != size {
		h.blobs.Abort(staged)
		return fmt.Errorf("%w: blob sha256:%x does not hash to its name", backup.ErrMalformed, d)
	}
	return h.blobs.Commit(h.ctx, staged)
}

func (h *restoreHandler) BlobRef([32]byte) error { return nil }
