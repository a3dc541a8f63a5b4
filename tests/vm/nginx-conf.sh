# tests/vm/nginx-conf.sh — sourced. nginx_conf WORKDIR PORT ROOT prints the configuration of a
# foreground nginx (nginx-light) serving ROOT on 127.0.0.1:PORT, with its pid, error log and
# temporary files under WORKDIR: what the remote-base tests and benchmarks start in the guest
# (`nginx -c WORKDIR/nginx.conf -p WORKDIR -e WORKDIR/error.log`).
nginx_conf() {
  local w=$1 port=$2 root=$3
  cat <<CONF
user root;
daemon off;
master_process off;
worker_processes 1;
pid $w/nginx.pid;
error_log $w/error.log;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path $w/body;
  proxy_temp_path $w/proxy;
  fastcgi_temp_path $w/fastcgi;
  uwsgi_temp_path $w/uwsgi;
  scgi_temp_path $w/scgi;
  server { listen 127.0.0.1:$port; root $root; location / { } }
}
CONF
}
