package app

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/internal/buildinfo"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/backup"
)

// blobLister is a Sink that passes everything on and notes the blobs the
// versions list.
type blobLister struct {
	store.Sink
	blobs []string
	seen  map[string]bool
}

func (b *blobLister) Version(key string, v *kms.Version) error {
	for _, d := range v.Blobs {
		if !b.seen[d] {
			b.seen[d] = true
			b.blobs = append(b.blobs, d)
		}
	}
	return b.Sink.Version(key, v)
}

// ErrNoBackup: the store cannot dump itself.
var ErrNoBackup = errors.New("this store cannot be backed up online")

// Backup writes a backup of everything kmsd holds to w: the store as of
// one read, then the HE blobs its versions list (withBlobs; otherwise
// their digests), signed with the identity key. It returns the backup's
// summary and id. What it writes holds sealed secrets only.
func (a *App) Backup(ctx context.Context, w io.Writer, withBlobs bool) (backup.Summary, string, error) {
	d, ok := a.cfg.Store.(store.Dumper)
	if !ok {
		return backup.Summary{}, "", ErrNoBackup
	}
	driver := "?"
	if n, ok := a.cfg.Store.(interface{ Driver() string }); ok {
		driver = n.Driver()
	}
	bw, err := backup.NewWriter(w, backup.Header{Created: time.Now().UTC().Format(time.RFC3339), Store: driver, Kmsd: buildinfo.String("kmsd"), WithBlobs: withBlobs})
	if err != nil {
		return backup.Summary{}, "", err
	}
	bl := &blobLister{Sink: bw, seen: map[string]bool{}}
	if err := d.Dump(ctx, bl); err != nil {
		return backup.Summary{}, "", fmt.Errorf("read the store: %w", err)
	}
	for _, ds := range bl.blobs {
		h, err := he.Digest(ds).Hex()
		if err != nil {
			return backup.Summary{}, "", err
		}
		var sum [32]byte
		raw, _ := hex.DecodeString(h)
		copy(sum[:], raw)
		if !withBlobs {
			if err := bw.BlobRef(sum); err != nil {
				return backup.Summary{}, "", err
			}
			continue
		}
		if a.Blobs == nil {
			return backup.Summary{}, "", fmt.Errorf("a version lists blob %s and this kmsd has no blob store", ds)
		}
		f, err := a.Blobs.Open(ctx, he.Digest(ds))
		if err != nil {
			return backup.Summary{}, "", fmt.Errorf("blob %s: %w", ds, err)
		}
		size, err := f.Seek(0, io.SeekEnd)
		if err == nil {
			_, err = f.Seek(0, io.SeekStart)
		}
		if err == nil {
			err = bw.Blob(sum, size, f)
		}
		f.Close()
		if err != nil {
			return backup.Summary{}, "", fmt.Errorf("blob %s: %w", ds, err)
		}
	}
	return bw.Finish(ctx, func(ctx context.Context, digest []byte) ([]byte, uint64, error) {
		sig, v, err := a.Service.SignAsIdentity(ctx, digest, []byte(backup.SignContext))
		return sig, v, err
	})
}
