package archive_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api/layout"
	"github.com/kmsd-project/kmsd/audit"
	"github.com/kmsd-project/kmsd/internal/s3conn"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/tests3"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/archive"
	"github.com/kmsd-project/kmsd/store/bolt"
)

func TestMain(m *testing.M) { testhsm.Main(m) }

// logFixture is a real bbolt store's audit log with a checkpoint signer.
type logFixture struct {
	pub    []byte
	store  *bolt.Store
	log    *audit.Log
	n      int
	path   string
	sealer kms.Sealer
	sign   func(context.Context, []byte) ([]byte, error)
}

func newLog(t testing.TB) *logFixture {
	pk, sk, _ := mldsa65.GenerateKey(rand.Reader)
	pub, _ := pk.MarshalBinary()
	path, sealer := filepath.Join(t.TempDir(), "kms.db"), testhsm.Open(t)
	st, err := bolt.Open(path, bolt.Options{Sealer: sealer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	sign := func(_ context.Context, msg []byte) ([]byte, error) {
		sig := make([]byte, mldsa65.SignatureSize)
		return sig, mldsa65.SignTo(sk, msg, nil, true, sig)
	}
	return &logFixture{pub: pub, store: st, log: audit.New(audit.Config{Store: st.Audit(), PublicKey: pub, Sign: sign}), path: path, sealer: sealer, sign: sign}
}

// reopen closes the store and opens it again (a restart).
func (f *logFixture) reopen(t testing.TB) {
	t.Helper()
	if err := f.store.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(f.path, bolt.Options{Sealer: f.sealer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f.store = st
	f.log = audit.New(audit.Config{Store: st.Audit(), PublicKey: f.pub, Sign: f.sign})
}

// add appends n records (from 16 goroutines, so the store group-commits
// them) and signs a checkpoint of the whole log.
func (f *logFixture) add(t testing.TB, n int) {
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; i < n; i += 16 {
				rec := &kms.AuditRecord{Time: "2026-12-07T00:00:00Z", RequestID: fmt.Sprintf("r%d-%d", f.n, i), Actor: "0123456789abcdef",
					Operation: "GET /v1/keys/{name}/versions/{version}/public-key", Key: "k", Version: 1, Status: 200}
				if err := f.store.Audit().AppendAudit(ctx, rec); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	f.n += n
	if _, err := f.log.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
}

// rootFromTiles recomputes the tree's root from the archive's level-0
// tiles alone, as any tlog-tiles client can: no kmsd code beyond the
// tile paths. It returns the checkpoint's size and root and the
// recomputed root.
func rootFromTiles(t *testing.T, dir string) (uint64, []byte, []byte) {
	t.Helper()
	cp, err := os.ReadFile(filepath.Join(dir, "checkpoint"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(cp), "\n")
	size, err := strconv.ParseUint(lines[1], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := base64.StdEncoding.DecodeString(lines[2])
	var leaves [][]byte
	for n := uint64(0); uint64(len(leaves)) < size; n++ {
		w := 0
		if left := size - uint64(len(leaves)); left < 256 {
			w = int(left)
		}
		tile, err := os.ReadFile(filepath.Join(dir, layout.TilePath(0, n, w)))
		if err != nil {
			t.Fatal(err)
		}
		bundle, err := os.ReadFile(filepath.Join(dir, layout.EntriesPath(n, w)))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(tile); i += 32 {
			leaves = append(leaves, tile[i:i+32])
		}
		// Each entry of the bundle hashes to its leaf (RFC 6962: 0x00
		// then the entry).
		for i, j := 0, len(leaves)-len(tile)/32; i < len(bundle); j++ {
			l := int(binary.BigEndian.Uint16(bundle[i:]))
			h := sha256.Sum256(append([]byte{0}, bundle[i+2:i+2+l]...))
			if !bytes.Equal(h[:], leaves[j]) {
				t.Fatalf("entry %d does not hash to its leaf in %s", j, layout.TilePath(0, n, w))
			}
			i += 2 + l
		}
	}
	return size, root, mth(leaves)
}

// mth is RFC 6962's Merkle tree hash of leaf hashes.
func mth(leaves [][]byte) []byte {
	if len(leaves) == 1 {
		return leaves[0]
	}
	k := 1
	for k*2 < len(leaves) {
		k *= 2
	}
	h := sha256.Sum256(append(append([]byte{1}, mth(leaves[:k])...), mth(leaves[k:])...))
	return h[:]
}

// TestArchiveIsATlogTilesLog: records a checkpoint covers become entry
// bundles and tiles any tlog-tiles client reads: the root recomputed from
// the level-0 tiles is the signed checkpoint's; the archive grows with
// the log without rewriting a full tile; and the archive verifies.
func TestArchiveIsATlogTilesLog(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	w := &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: f.store.Audit()}
	ctx := context.Background()
	if n, err := w.Sync(ctx); err != nil || n != 0 {
		t.Fatalf("sync of a log without a checkpoint: %d %v", n, err)
	}
	f.add(t, 700)
	if n, err := w.Sync(ctx); err != nil || n != 700 {
		t.Fatalf("sync: %d %v", n, err)
	}
	size, root, got := rootFromTiles(t, dir)
	if size != 700 || !bytes.Equal(root, got) {
		t.Fatalf("size %d: root from the tiles %x, the checkpoint says %x", size, got, root)
	}
	full := filepath.Join(dir, layout.TilePath(0, 1, 0))
	before, err := os.Stat(full)
	if err != nil {
		t.Fatal(err)
	}
	f.add(t, 300)
	if n, err := w.Sync(ctx); err != nil || n != 1000 {
		t.Fatalf("second sync: %d %v", n, err)
	}
	if size, root, got := rootFromTiles(t, dir); size != 1000 || !bytes.Equal(root, got) {
		t.Fatalf("after growing: size %d, roots %x %x", size, got, root)
	}
	after, _ := os.Stat(full)
	if !os.SameFile(before, after) || !after.ModTime().Equal(before.ModTime()) {
		t.Fatal("a full tile was rewritten")
	}
	// A partial tile of an older checkpoint stays (its path names its
	// width): a client that verified the older checkpoint finds it.
	if _, err := os.Stat(filepath.Join(dir, layout.TilePath(0, 2, 188))); err != nil {
		t.Fatalf("partial tile of the first checkpoint: %v", err)
	}
	res, err := archive.Verify(ctx, archive.Dir{Root: dir}, f.pub)
	if err != nil || res.Size != 1000 {
		t.Fatalf("verify: %+v %v", res, err)
	}
}

// TestArchiveLevelOneTiles: past 65,536 records the level-1 tile is full
// and written once; the tiles still give the root.
func TestArchiveLevelOneTiles(t *testing.T) {
	f := newLog(t)
	dir := t.TempDir()
	w := &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: f.store.Audit()}
	f.add(t, 65600)
	if _, err := w.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{layout.TilePath(1, 0, 0), layout.TilePath(2, 0, 1), layout.TilePath(0, 256, 64), layout.TilePath(1, 1, 0)} {
		_, err := os.Stat(filepath.Join(dir, p))
		if want := p != layout.TilePath(1, 1, 0); (err == nil) != want {
			t.Errorf("%s: %v", p, err)
		}
	}
	if size, root, got := rootFromTiles(t, dir); size != 65600 || !bytes.Equal(root, got) {
		t.Fatalf("size %d, roots %x %x", size, got, root)
	}
	if _, err := archive.Verify(context.Background(), archive.Dir{Root: dir}, f.pub); err != nil {
		t.Fatal(err)
	}
}

// failing is a bucket whose Put fails after `after` successful ones (a
// full disk, a crash mid-sync).
type failing struct {
	archive.Bucket
	mu    sync.Mutex
	after int
}

func (b *failing) Put(ctx context.Context, path string, data []byte, immutable bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.after == 0 {
		return errors.New("no space left on device")
	}
	b.after--
	return b.Bucket.Put(ctx, path, data, immutable)
}

// TestArchiveCutShort: a sync that stops part way (at every point: after
// each resource it writes) leaves the archive's checkpoint where it was;
// the next sync, by another writer (a restarted kmsd), completes it, and
// the archive verifies.
func TestArchiveCutShort(t *testing.T) {
	f := newLog(t)
	f.add(t, 600)
	ctx := context.Background()
	for after := 0; after < 8; after++ {
		dir := t.TempDir()
		cut := &archive.Writer{Bucket: &failing{Bucket: archive.Dir{Root: dir}, after: after}, Store: f.store.Audit()}
		if _, err := cut.Sync(ctx); err == nil {
			t.Fatalf("cut after %d: no error", after)
		}
		if _, err := os.Stat(filepath.Join(dir, "checkpoint")); err == nil {
			t.Fatalf("cut after %d: the checkpoint was written before what it covers", after)
		}
		w := &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: f.store.Audit()}
		if n, err := w.Sync(ctx); err != nil || n != 600 {
			t.Fatalf("cut after %d, then sync: %d %v", after, n, err)
		}
		if _, err := archive.Verify(ctx, archive.Dir{Root: dir}, f.pub); err != nil {
			t.Fatalf("cut after %d: %v", after, err)
		}
	}
}

// TestArchiveRefusesOtherBytes: a full tile or bundle already in the
// archive with other bytes (another log's archive, or an edit) stops the
// sync with ErrConflict naming it, and the checkpoint does not move.
func TestArchiveRefusesOtherBytes(t *testing.T) {
	f := newLog(t)
	f.add(t, 300)
	dir := t.TempDir()
	p := filepath.Join(dir, layout.EntriesPath(0, 0))
	os.MkdirAll(filepath.Dir(p), 0o755)
	os.WriteFile(p, []byte("\x00\x01x"), 0o644)
	w := &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: f.store.Audit()}
	if _, err := w.Sync(context.Background()); !errors.Is(err, archive.ErrConflict) || !strings.Contains(err.Error(), layout.EntriesPath(0, 0)) {
		t.Fatalf("sync over other bytes: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "checkpoint")); err == nil {
		t.Fatal("the checkpoint moved")
	}
}

// TestVerifyNamesTheEditedTile: an archived tile or bundle edited after
// the fact is found by Verify, which names it.
func TestVerifyNamesTheEditedTile(t *testing.T) {
	f := newLog(t)
	f.add(t, 600)
	ctx := context.Background()
	for _, p := range []string{layout.TilePath(0, 1, 0), layout.EntriesPath(0, 0), layout.TilePath(0, 2, 88), layout.EntriesPath(2, 88), layout.TilePath(1, 0, 2)} {
		dir := t.TempDir()
		w := &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: f.store.Audit()}
		if _, err := w.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		b[len(b)-5] ^= 1
		os.WriteFile(filepath.Join(dir, p), b, 0o644)
		if _, err := archive.Verify(ctx, archive.Dir{Root: dir}, f.pub); err == nil || !strings.Contains(err.Error(), p) {
			t.Errorf("%s edited: %v", p, err)
		}
	}
	// Signed by another key: refused.
	g := newLog(t)
	dir := t.TempDir()
	w := &archive.Writer{Bucket: archive.Dir{Root: dir}, Store: f.store.Audit()}
	w.Sync(ctx)
	if _, err := archive.Verify(ctx, archive.Dir{Root: dir}, g.pub); err == nil {
		t.Fatal("an archive verified under another identity key")
	}
}

// TestArchiveOnS3: the same archive in an S3-compatible bucket (a real
// versitygw): written, grown, verified; other bytes at an immutable
// path refused; and the server down fails a sync without moving the
// checkpoint.
func TestArchiveOnS3(t *testing.T) {
	srv := tests3.Start(t)
	ctx := context.Background()
	b, err := archive.OpenS3(ctx, archive.S3Config{Bucket: srv.Bucket, Prefix: "kmsd/audit/",
		Config: s3conn.Config{Endpoint: srv.Endpoint, AccessKeyID: srv.AccessKey, SecretAccessKey: srv.SecretKey}})
	if err != nil {
		t.Fatal(err)
	}
	f := newLog(t)
	f.add(t, 300)
	w := &archive.Writer{Bucket: b, Store: f.store.Audit()}
	if n, err := w.Sync(ctx); err != nil || n != 300 {
		t.Fatalf("sync: %d %v", n, err)
	}
	f.add(t, 250)
	if n, err := w.Sync(ctx); err != nil || n != 550 {
		t.Fatalf("sync: %d %v", n, err)
	}
	if res, err := archive.Verify(ctx, b, f.pub); err != nil || res.Size != 550 {
		t.Fatalf("verify: %v %v", res, err)
	}
	// The objects are where the paths say, under the prefix.
	if _, err := os.Stat(filepath.Join(srv.Dir, srv.Bucket, "kmsd/audit", layout.TilePath(0, 1, 0))); err != nil {
		t.Fatalf("full tile 1 in the bucket: %v", err)
	}
	if err := b.Put(ctx, layout.TilePath(0, 0, 0), []byte("other"), true); !errors.Is(err, archive.ErrConflict) {
		t.Fatalf("other bytes at a full tile: %v", err)
	}
	srv.Stop()
	f.add(t, 10)
	if n, err := w.Sync(ctx); err == nil || n != 550 {
		t.Fatalf("sync with the server down: %d %v", n, err)
	}
}
