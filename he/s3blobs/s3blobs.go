// Package s3blobs keeps the HE kinds' blobs (he.Blobs) in an S3-compatible
// bucket, so that kmsd replicas share them: a keyset generated on one
// replica is served by all.
//
// A blob is spooled to a local file while it is hashed (its name is its
// digest, known only at the end), then uploaded under Prefix + its hex
// digest; S3 answers a PUT once the object is durable, and an object is
// visible whole or not at all. The bucket must exist: kmsd does not
// create it.
package s3blobs

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/internal/s3conn"
)

// Config says where the blobs go.
type Config struct {
	// Endpoint is the server's URL: https://host[:port], or http:// to a
	// loopback address only (the caller checks; see CheckEndpoint).
	Endpoint string
	Bucket   string
	// Prefix goes before each blob's hex digest in its object name
	// (default "kmsd/blobs/").
	Prefix string
	Region string // default "us-east-1"
	// AccessKeyID and SecretAccessKey sign requests (AWS Signature V4);
	// SessionToken is for temporary credentials.
	AccessKeyID, SecretAccessKey, SessionToken string
	// RootCAs verifies the server's certificate (nil: the system's).
	RootCAs *x509.CertPool
	// SpoolDir holds blobs while they are hashed, before their upload.
	SpoolDir string
}

// Store is he.Blobs on S3.
type Store struct {
	c      *minio.Client
	bucket string
	prefix string
	spool  string
}

var _ he.Blobs = (*Store)(nil)

const spoolPrefix = ".spool-"

// CheckEndpoint refuses an endpoint kmsd should not send credentials to:
// anything but https, or http to a loopback address; a URL with
// credentials, a path, a query or a fragment. Its errors never echo the
// URL, which may hold a secret.
func CheckEndpoint(endpoint string) (*url.URL, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, errors.New("not a URL")
	}
	switch {
	case u.User != nil:
		return nil, errors.New("credentials in the URL are refused: give them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
	case u.RawQuery != "" || u.Fragment != "" || (u.Path != "" && u.Path != "/"):
		return nil, errors.New("want scheme://host[:port] only, no path, query or fragment")
	case u.Host == "":
		return nil, errors.New("no host")
	case u.Scheme == "https":
		return u, nil
	case u.Scheme == "http":
		ip := net.ParseIP(u.Hostname())
		if u.Hostname() == "localhost" || (ip != nil && ip.IsLoopback()) {
			return u, nil
		}
		return nil, errors.New("plain http is for a loopback address only: use https")
	}
	return nil, errors.New("want https (or http to a loopback address)")
}

// Open connects and checks that the bucket exists and the credentials
// reach it.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	u, err := CheckEndpoint(cfg.Endpoint)
	if err != nil {
		return nil, fmt.Errorf("s3 endpoint: %w", err)
	}
	if cfg.Bucket == "" {
		return nil, errors.New("s3: a bucket is required")
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "kmsd/blobs/"
	}
	if cfg.SpoolDir == "" {
		return nil, errors.New("s3: a spool directory is required")
	}
	if cfg.AccessKeyID == "" || cfg.SecretAccessKey == "" {
		return nil, errors.New("s3: credentials are required (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
	}
	if err := os.MkdirAll(cfg.SpoolDir, 0o700); err != nil {
		return nil, err
	}
	if err := he.CleanSpool(cfg.SpoolDir, spoolPrefix); err != nil {
		return nil, err
	}
	c, err := s3conn.Open(ctx, s3conn.Config{Endpoint: u.String(), Region: cfg.Region, AccessKeyID: cfg.AccessKeyID,
		SecretAccessKey: cfg.SecretAccessKey, SessionToken: cfg.SessionToken, RootCAs: cfg.RootCAs}, cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("s3: %w", err)
	}
	return &Store{c: c, bucket: cfg.Bucket, prefix: cfg.Prefix, spool: cfg.SpoolDir}, nil
}

func (s *Store) name(d he.Digest) (string, error) {
	h, err := d.Hex()
	if err != nil {
		return "", err
	}
	return s.prefix + h, nil
}

func (s *Store) Stage(write func(io.Writer) error) (*he.Staged, error) {
	return he.Spool(s.spool, spoolPrefix, write)
}

// Commit uploads the spooled blob and removes the spool file.
func (s *Store) Commit(ctx context.Context, st *he.Staged) error {
	defer st.Discard()
	name, err := s.name(st.Digest)
	if err != nil {
		return err
	}
	if _, err := st.File.Seek(0, io.SeekStart); err != nil {
		return err
	}
	info, err := s.c.PutObject(ctx, s.bucket, name, st.File, st.Size, minio.PutObjectOptions{ContentType: "application/octet-stream"})
	if err != nil {
		return fmt.Errorf("s3: put %s: %w", st.Digest, err)
	}
	if info.Size != st.Size {
		return fmt.Errorf("s3: put %s: the server took %d bytes of %d", st.Digest, info.Size, st.Size)
	}
	return nil
}

func (s *Store) Abort(st *he.Staged) { st.Discard() }

// Sync has nothing to do: S3 acknowledged each upload once it was durable.
func (s *Store) Sync(context.Context) error { return nil }

func isNotFound(err error) bool { return s3conn.NotFound(err) }

// Open returns the object, read with ranged GETs as it is read and
// sought.
func (s *Store) Open(ctx context.Context, d he.Digest) (io.ReadSeekCloser, error) {
	name, err := s.name(d)
	if err != nil {
		return nil, err
	}
	o, err := s.c.GetObject(ctx, s.bucket, name, minio.GetObjectOptions{})
	var info minio.ObjectInfo
	if err == nil {
		info, err = o.Stat()
	}
	if err != nil {
		if o != nil {
			o.Close()
		}
		if isNotFound(err) {
			return nil, fmt.Errorf("%w: %s", he.ErrBlobNotFound, d)
		}
		return nil, fmt.Errorf("s3: get %s: %w", d, err)
	}
	return versioned{o, fmt.Sprintf("s3 %s %d %d %s", info.ETag, info.Size, info.LastModified.UnixNano(), info.VersionID)}, nil
}

func (s *Store) Remove(ctx context.Context, d he.Digest) error {
	name, err := s.name(d)
	if err != nil {
		return err
	}
	if err := s.c.RemoveObject(ctx, s.bucket, name, minio.RemoveObjectOptions{}); err != nil && !isNotFound(err) {
		return fmt.Errorf("s3: remove %s: %w", d, err)
	}
	return nil
}

// RemoveOrphans lists the prefix; objects whose names are not digests are
// not kmsd's and are left alone. The objects' times are the server's.
func (s *Store) RemoveOrphans(ctx context.Context, keep map[he.Digest]bool, before time.Time) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	n := 0
	for o := range s.c.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: s.prefix, Recursive: true}) {
		if o.Err != nil {
			return n, fmt.Errorf("s3: list: %w", o.Err)
		}
		d := he.Digest("sha256:" + strings.TrimPrefix(o.Key, s.prefix))
		if _, err := d.Hex(); err != nil || keep[d] || !o.LastModified.Before(before) {
			continue
		}
		if err := s.Remove(ctx, d); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// versioned is an opened object with what identifies its bytes (he.Versioned).
type versioned struct {
	*minio.Object
	version string
}

// BlobVersion implements he.Versioned.
func (v versioned) BlobVersion() string { return v.version }
